# Fourth device call (2026-12-07, twenty-third session): where the flush step's quantize-append
# time goes with ff8413a's lane quantizer (call 3's bundle): --qa-trace over 33 chain steps (the
# flush steps 0 and 32) at the two 512-head shapes, innerq and kivi2, for ff8413a and main e07e580.
set -u
(cd .device && xz -dc b.txz | tar xf -)
for b in kvq-bench kvq-bench-base; do
  timeout 120 .device/run $b kernels --presets innerq,kivi2 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 \
    --qa-steps 33 --qa-trace --no-check > $OUT/trace-$b.txt 2>&1; echo "$b rc=$?"
  grep -E 'qatrace .* step (0|1|32) ' $OUT/trace-$b.txt | cut -c1-420
  xz -9 $OUT/trace-$b.txt
done
