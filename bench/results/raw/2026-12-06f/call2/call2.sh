# One device call (2026-12-06, sixteenth session): chained units A/B against the kernels before
# them (kvq-bench-base = e8a4a05), then the recorded round.
set -u
S4="--shape 1,32,32,32768,128 --shape 16,32,32,4096,128 --shape 16,32,8,32768,128 --shape 64,32,8,8192,128"
SUITE=0 VARIANTS="kvq-bench-base;kvq-bench;kvq-bench:--no-chain;kvq-bench:--chain" OUT=$OUT/a \
  bash bench/device_ab.sh 1 kernels --presets innerq,kivi2 $S4 2>&1 | tail -40
LEAN=1 FLUSH_READ=1 BUDGET=400 OUT=$OUT bash bench/device_round.sh 2>&1 | tail -60
