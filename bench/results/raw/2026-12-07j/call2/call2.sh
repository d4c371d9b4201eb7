# Second device call (twenty-ninth session): branch kivi-lean (0ccb904: the KIVI code units' tile
# loop 927 -> 800 static instructions at 2 bits, 957 -> 825 at 4) against main 555fc09's kvq-bench. The GPU
# suite and memcheck on the KIVI code units' tests, two alternating rounds at the shapes where the
# code units run (innerq2 as the control: its code did not change).
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<main 555fc09's kvq-bench> bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07j/call2/call2.sh
SUITE=1 FILTER='KernelsGpu.KiviCodes*' VARIANTS="kvq-bench-base;kvq-bench" \
  OUT=$OUT/a bash bench/device_ab.sh 2 kernels --presets kivi2,kivi4,innerq2 \
  --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 --shape 1,32,32,32768,128 --shape 1,9,3,8192,64 2>&1 | grep -v "^1,\|^16,\|^64,\|^4," | tail -8
mkdir -p $OUT/a/r && tar xzf $OUT/a/ab.tgz -C $OUT/a
for v in 0 1; do for i in 1 2; do grep -E "^[0-9]+ " $OUT/a/r/v$v.$i.txt | \
  awk -v v=$v '{print "v"v, $1","$2","$3","$4","$5, $6, $7, $10, $15}'; done; done | sort -k2,3 -k1,1
rm -rf $OUT/a/r
# (Nsight Compute left out: the session's device time went to failed machine starts; call1.sh has it)
