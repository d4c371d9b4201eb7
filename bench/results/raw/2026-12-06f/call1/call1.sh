# One device call (2026-12-06, sixteenth session): GPU suite + memcheck (page tests), early first
# pages and unit order A/B, unit trace, page-unit rule re-check.
set -u
S4="--shape 16,32,32,4096,128 --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 --shape 1,32,32,32768,128"
FILTER='*Pages*:*PageUnits*' VARIANTS="kvq-bench;kvq-bench:--no-early-pages --presets innerq;kvq-bench:--bodies-first;kvq-bench:--bodies-first --pdl" OUT=$OUT/a \
  bash bench/device_ab.sh 2 kernels --presets innerq,kivi2 $S4 2>&1 | tail -80
mkdir -p $OUT/t
timeout 100 .device/run kvq-bench-trace kernels --unit-trace --flush read --presets innerq,kivi2 $S4 > $OUT/t/trace.txt 2>&1
echo "trace rc=$?"; grep -A3 "^unittrace" $OUT/t/trace.txt | head -150
S5="--shape 1,32,32,8192,128 --shape 1,32,32,4096,128 --shape 16,32,8,8192,128 --shape 4,32,8,8192,128 --shape 16,32,8,16384,128"
SUITE=0 VARIANTS="kvq-bench;kvq-bench:--page-min-pages 0" OUT=$OUT/b \
  bash bench/device_ab.sh 1 kernels --presets innerq $S5 2>&1 | tail -30
