# Third device call (twenty-ninth session), on the machine call 2 left warm, same bundle (branch
# kivi-lean 0ccb904): Nsight Compute on the branch's kivi2 attention launch at (16,32,8,32768),
# its stall samples summed by SASS opcode.
# device tool, carry [".device"]:
(cd .device && xz -dc b.txz | tar xf -) && OUT=$OUT/n timeout 170 bash bench/ncu_stalls.sh kivi2_gqa 16,32,8,32768,128 kivi2; python3 scripts/ncu_sass_by_opcode.py $OUT/n/kivi2_gqa_sass.csv 22; grep -E "Stall|Warp Cycles|Issue Slot|Eligible|Active Warps" $OUT/n/kivi2_gqa.txt | head -20; gzip -9 $OUT/n/*.csv $OUT/n/*.txt 2>/dev/null
