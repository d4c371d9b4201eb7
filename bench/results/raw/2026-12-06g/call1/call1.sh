# One device call (2026-12-06, seventeenth session): merge-split + PageCopy (bundled kvq-bench and
# kernels_gpu_test, from the tree of branch merge-split) against main 0eff4e8 (kvq-bench-base); the
# unit trace by SM load (main's tree, -DKVQ_UNIT_TRACE=ON); then the round on the candidate.
set -u
S3="--shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 16,32,32,4096,128"
SUITE=0 VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a timeout 200 \
  bash bench/device_ab.sh 2 kernels --presets innerq,kivi2,fp16 $S3 2>&1 | tail -40
SUITE=0 VARIANTS="kvq-bench;kvq-bench:--bodies-first" OUT=$OUT/b timeout 60 \
  bash bench/device_ab.sh 1 kernels --presets kivi2,kivi4,innerq2 --shape 64,32,8,8192,128 2>&1 | tail -12
mkdir -p $OUT/t
for f in "" "--split-blocks 592" "--split-blocks 724"; do
  echo "== trace $f" >> $OUT/t/trace.txt
  timeout 40 .device/run kvq-bench-trace kernels --unit-trace --flush read --presets innerq,kivi2 --shape 1,32,32,32768,128 $f >> $OUT/t/trace.txt 2>&1
done
timeout 40 .device/run kvq-bench-trace kernels --unit-trace --flush read --presets innerq --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 >> $OUT/t/trace.txt 2>&1
grep -E "^== |attn:|by units|^  (pages|imma|tokens)" $OUT/t/trace.txt | grep -A4 "attn:" | head -90
xz -9 $OUT/t/trace.txt
LEAN=1 FLUSH_READ=1 BUDGET=$(( 570 - SECONDS )) OUT=$OUT bash bench/device_round.sh 2>&1 | tail -60
