# One device call (2026-12-06, seventeenth session): page pools (set_page_pool, kvq-bench
# --page-pool SHARE) against main 0eff4e8 (kvq-bench-base); GPU suite and memcheck of the page
# tests first; then the unit trace with pools.
set -u
S4="--shape 1,32,32,32768,128 --shape 16,32,8,32768,128 --shape 16,32,32,4096,128 --shape 1,32,32,4096,128"
FILTER='*Page*' VARIANTS="kvq-bench-base;kvq-bench:--page-pool 0;kvq-bench:--page-pool 0.5;kvq-bench:--page-pool 0.75;kvq-bench:--page-pool 0.25" OUT=$OUT/a timeout 420 \
  bash bench/device_ab.sh 2 kernels --presets innerq,innerq2 $S4 2>&1 | tail -90
mkdir -p $OUT/t
for f in "--page-pool 0" "--page-pool 0.5"; do
  echo "== trace $f" >> $OUT/t/trace.txt
  timeout 40 .device/run kvq-bench-trace kernels --unit-trace --flush read --presets innerq --shape 1,32,32,32768,128 --shape 16,32,8,32768,128 $f >> $OUT/t/trace.txt 2>&1
done
grep -E "^== |attn:|^  pages" $OUT/t/trace.txt | head -60
xz -9 $OUT/t/trace.txt
