# Second device call (2026-12-07, twenty-seventh session). Branch tile-trace: main's kernels built
# with -DKVQ_UNIT_TRACE=ON, whose per-token loop now also sums SM cycles per warp tile by phase
# (key scores, softmax, value locations, values: trace slots 8-12). Why: the around units of
# (64,32,8,8192) take ~22 us per 32-token warp tile, and asking for their rows into L2 first
# (branch prefetch-around, call 1) did not make them faster, so what they wait on is not DRAM.
# bundle: BUILD=/work/btrace BENCH_ONLY=1 bash scripts/device_bundle.sh   (/work/btrace: cmake
#   -DCMAKE_BUILD_TYPE=Release -DKVQ_UNIT_TRACE=ON)
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07h/call2/call2.sh
(cd .device && xz -dc b.txz | tar xf -) || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
mkdir -p $OUT/t
timeout 200 .device/run kvq-bench kernels --unit-trace --presets innerq2,innerq,kivi2 \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,9,3,8192,64 > $OUT/t/trace.txt 2>&1
echo "trace rc=$?"
grep -A5 "^unittrace.* attn" $OUT/t/trace.txt | grep "unittrace\|per-token" | cut -c1-400 | head -60
gzip -9 $OUT/t/trace.txt
