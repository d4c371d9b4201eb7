# Second device call (2026-12-07, twenty-sixth session). Main after the pp2 merge (the IMMA warp
# rings' units on the run-time-mode instance), built with branch stagger's host code (the kernels
# are main's: no kernel source changed): the GPU suite (with the staggered order's new cases) and
# memcheck of the IMMA / page tests; then where innerq2's time goes at (64,32,8,8192) (70.6-71.3% of
# copy, the one InnerQ miss of the 75% target). Variants of the plan's run-time choices: the
# staggered order (--staggered: half the items' bodies first beside the other half's per-token
# units, then the rest), bodies first, more body units (--split-blocks 1056: two per item), both.
# Then a unit trace (kvq-bench-trace = the same source built with -DKVQ_UNIT_TRACE=ON), default
# order and staggered, beside (16,32,8,32768), where innerq2 reads at 77.6%.
# bundle: NO_STORE_TESTS=1 BUILD=build EXTRA_BINS=<kvq-bench of /work/btrace, named kvq-bench-trace> \
#   bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07g/call2/call2.sh
SUITE=1 FILTER='*ImmaBody*:*Pages*:*BodiesFirst*' \
  VARIANTS="kvq-bench;kvq-bench:--staggered;kvq-bench:--bodies-first;kvq-bench:--split-blocks 1056;kvq-bench:--staggered --split-blocks 1056" \
  OUT=$OUT/a bash bench/device_ab.sh 2 kernels --presets innerq2,innerq \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 2>&1 | tail -50
mkdir -p $OUT/t
for v in "" "--staggered"; do
  timeout 100 .device/run kvq-bench-trace kernels --unit-trace --presets innerq2,innerq $v \
    --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 >> $OUT/t/trace.txt 2>&1
  echo "trace $v rc=$?"
done
grep -A3 "^unittrace" $OUT/t/trace.txt | cut -c1-700 | head -80
