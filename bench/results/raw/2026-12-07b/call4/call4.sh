# Fourth device call (2026-12-07, twenty-first session), measurement only, the final build (bundle as
# call 3's): where the quantize-append's remaining time per step goes at the 512-head shapes, the
# one-token steps (one block of four warps per head) against the along_tokens flush every 32 steps
# (innerq's values) or 128 (kivi2's keys): each chain step's times, and the phase trace.
(cd .device && xz -dc b.txz | tar xf -)
timeout 120 .device/run kvq-bench kernels --presets innerq,kivi2 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 \
  --qa-steps 64 --chain-dump > $OUT/chain.txt 2>&1; echo "chain rc=$?"; grep -E '^(16|64) ' $OUT/chain.txt
grep -E 'step (0|1|2|31|32|33):' $OUT/chain.txt
timeout 60 .device/run kvq-bench kernels --presets innerq --shape 16,32,32,4096,128 --qa-steps 34 --qa-trace \
  > $OUT/trace4.txt 2>&1; echo "trace rc=$?"; grep -E 'step (0|1|32|33) .*qa:|mean over' $OUT/trace4.txt
xz -9 $OUT/chain.txt $OUT/trace4.txt
