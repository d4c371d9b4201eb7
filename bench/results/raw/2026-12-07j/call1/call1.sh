# First device call (twenty-ninth session): where the KIVI code units' warps wait. Nsight Compute on
# one kivi2 attention launch at (16,32,8,32768) (main 555fc09's kvq-bench), the stall samples per
# SASS instruction summed by opcode, plus a plain timing of main at the GQA shapes for the record.
# bundle: BUILD=build BENCH_ONLY=1 bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07j/call1/call1.sh
(cd .device && xz -dc b.txz | tar xf -) || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
OUT=$OUT/n timeout 300 bash bench/ncu_stalls.sh kivi2_gqa 16,32,8,32768,128 kivi2
echo "ncu rc=$?"
python3 scripts/ncu_sass_by_opcode.py $OUT/n/kivi2_gqa_sass.csv 25
grep -E "Stall|stall" $OUT/n/kivi2_gqa.txt | head -30
gzip -9 $OUT/n/*.csv $OUT/n/*.txt
timeout 120 .device/run kvq-bench kernels --presets kivi2,innerq2 --shape 16,32,8,32768,128 \
  --shape 64,32,8,8192,128 > $OUT/bench.txt 2>&1
grep -E "^[0-9]+ " $OUT/bench.txt | awk '{print $1","$2","$3","$4, $6, "attn", $7, "copy", $10, "qa_step", $15}'
