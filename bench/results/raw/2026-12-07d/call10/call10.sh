# Tenth device call (2026-12-07, twenty-third session): branch qa-sums afe909b (the hybrid
# errors four loads at a time in the per-head kernel only; every kernel SASS-identical to main's or
# to call 9's device-tested build) as kvq-bench against main (kvq-bench-base: call 7's). Two
# alternating rounds, no suite (no kernel that has not run the suite on the H100).
# bundle: BUILD=build BASE_BIN=<call 7's kvq-bench> BENCH_ONLY=1 bash scripts/device_bundle.sh
set -u
S="--shape 1,32,32,4096,128 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128"
SUITE=0 VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a timeout 150 bash bench/device_ab.sh 2 kernels --presets innerq2,innerq,kivi2 $S 2>&1 | tail -40
