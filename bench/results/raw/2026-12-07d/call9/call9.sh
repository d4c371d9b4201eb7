# Ninth device call (2026-12-07, twenty-third session): branch qa-sums cc0f704 (the hybrid
# errors summed four loads at a time) as kvq-bench against main (kvq-bench-base: call 7's, built at
# e6e1f4c) and de851d2 (eight at a time, call 8: kvq-bench-by8). GPU suite and memcheck on the
# quantize-append, flush and decode-step tests; three alternating rounds (no store tests: the
# bundle leaves them out for the third kvq-bench; the quantize-append's host code is unchanged).
# bundle: BUILD=build BASE_BIN=<call 7's kvq-bench> EXTRA_BINS=<de851d2's as kvq-bench-by8> NO_STORE_TESTS=1 \
#   bash scripts/device_bundle.sh
set -u
S="--shape 1,32,32,4096,128 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 1,32,32,32768,128 --shape 1,9,3,8192,64"
FILTER='*Quantize*:*Flush*:*DecodeSteps*' SUITE=1 VARIANTS="kvq-bench-base;kvq-bench-by8;kvq-bench" OUT=$OUT/a \
  timeout 400 bash bench/device_ab.sh 3 kernels --presets innerq2,innerq,kivi2 $S 2>&1 | grep -E 'suite|memcheck|PASSED|FAILED|ERROR' | head
