# Second device call of branch mma-tiles (written in the twenty-eighth session; not run there: no
# device). The branch built with -DKVQ_UNIT_TRACE=ON: when the around units start and end with the
# full-precision tiles on the tensor cores and with them off (--no-mma-tiles), the mma tiles' own
# cycles (slots 13-14: "mma tiles" lines) and what is left on the per-token path (the quantized
# tails of the bodies, the mixed tiles) against the twenty-seventh session's call 4.
# bundle: BUILD=/work/btrace BENCH_ONLY=1 bash scripts/device_bundle.sh   (/work/btrace: cmake
#   -DCMAKE_BUILD_TYPE=Release -DKVQ_UNIT_TRACE=ON on the branch's source)
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07i/call2/call2.sh
(cd .device && xz -dc b.txz | tar xf -) || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
mkdir -p $OUT/t
for f in "" --no-mma-tiles; do
  timeout 200 .device/run kvq-bench kernels --unit-trace $f --presets innerq2,innerq,kivi2 \
    --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 > $OUT/t/trace$f.txt 2>&1
  echo "trace $f rc=$?"
  grep -A6 "^unittrace.* attn" $OUT/t/trace$f.txt | grep "unittrace\|per-token\|mma tiles\|tokens  units" | cut -c1-330 | head -40
  gzip -9 $OUT/t/trace$f.txt
done
