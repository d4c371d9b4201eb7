# One device call (2026-12-06, seventeenth session): the fused merge over every warp (MergeItemBlock)
# against main 0eff4e8 (kvq-bench-base): a two-round A/B, then the round (suite, store, service,
# the whole table against the base, SDPA, memcheck, read flush).
set -u
S4="--shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 1,9,3,8192,64 --shape 16,32,8,32768,128"
SUITE=0 VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a timeout 200 \
  bash bench/device_ab.sh 2 kernels --presets innerq,kivi2,fp16 $S4 2>&1 | tail -50
SUITE=0 VARIANTS="kvq-bench;kvq-bench:--bodies-first" OUT=$OUT/b timeout 70 \
  bash bench/device_ab.sh 1 kernels --presets kivi2,kivi4,innerq,innerq2,innerq_base --shape 64,32,8,8192,128 2>&1 | tail -14
LEAN=1 FLUSH_READ=1 BUDGET=$(( 575 - SECONDS )) OUT=$OUT bash bench/device_round.sh 2>&1 | tail -45
