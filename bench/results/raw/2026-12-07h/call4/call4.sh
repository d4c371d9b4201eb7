# Fourth device call (2026-12-07, twenty-seventh session). Main's kernels after the key-quads merge
# (ea2c32f: quads at head_dim 128; the product build SASS-identical to call 3's branch at D 128),
# built with -DKVQ_UNIT_TRACE=ON: the per-token tiles' phases with the quads, against call 2's
# without them (where did the key scores' cycles go, and what the values phase waits on).
# bundle: BUILD=/work/btrace BENCH_ONLY=1 bash scripts/device_bundle.sh   (/work/btrace: cmake
#   -DCMAKE_BUILD_TYPE=Release -DKVQ_UNIT_TRACE=ON)
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07h/call4/call4.sh
(cd .device && xz -dc b.txz | tar xf -) || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
mkdir -p $OUT/t
timeout 200 .device/run kvq-bench kernels --unit-trace --presets innerq2,innerq \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 4,32,8,16384,128 > $OUT/t/trace.txt 2>&1
echo "trace rc=$?"
grep -A5 "^unittrace.* attn" $OUT/t/trace.txt | grep "unittrace\|per-token\|tokens  units" | cut -c1-330 | head -60
gzip -9 $OUT/t/trace.txt
