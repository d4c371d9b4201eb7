# Third device call (twenty-eighth session), on call 2's bundle (the branch mma-tiles built with
# -DKVQ_UNIT_TRACE=ON: times include the trace's stamps, so compare only within this call). Call 2's
# trace: at (64,32,8,8192) the around units run first and alone (InnerQ's plan) and their mma tiles
# take ~29,000 cycles per warp tile, against ~9,800 in kivi2's launch, where the bodies go first. So:
# the bodies first (--bodies-first) with the tiles on and off, and its trace; and the trace with
# the L2 flush buffer read (is the around units' phase the write-back of the flush's dirty lines?).
# bundle: BUILD=/work/btrace BENCH_ONLY=1 bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07i/call3/call3.sh
(cd .device && xz -dc b.txz | tar xf -) || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/r
for i in 1 2; do
  for f in "" "--bodies-first" "--no-mma-tiles --bodies-first" "--no-mma-tiles"; do
    n=$(echo "x$f" | tr -d ' -')
    timeout 100 .device/run kvq-bench kernels --presets innerq2,innerq $f \
      --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 > $OUT/r/$n.$i.txt 2>&1
    grep -E "^(64|16) " $OUT/r/$n.$i.txt | awk -v f="$f" '{print $1","$2","$3","$4, $6, $7, $10, $NF, f}'
  done
done
# the trace with the bodies first; then with the timing's L2 flush buffer read instead of written
# (--flush read: no dirty lines for the launch's first reads to write back), tiles on and off
for f in "--bodies-first" "--flush read" "--flush read --no-mma-tiles"; do
  n=$(echo "x$f" | tr -d ' -')
  timeout 100 .device/run kvq-bench kernels --unit-trace $f --presets innerq2,innerq \
    --shape 64,32,8,8192,128 > $OUT/r/trace_$n.txt 2>&1
  echo "trace $f"
  grep -A8 "^unittrace.* attn" $OUT/r/trace_$n.txt | grep "unittrace\|per-token\|mma tiles\|units [0-9]" | cut -c1-420 | head -8
done
tar czf $OUT/c3.tgz -C $OUT r && rm -rf $OUT/r
