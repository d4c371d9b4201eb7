# Second device call (2026-12-07, twenty-third session): branch lane-quant (87ff685: the lane
# flush's quantizer without a division per element, LaneQuantizeGroup32) against main e07e580's
# kvq-bench (kvq-bench-base). GPU suite and memcheck on the quantize-append, flush and decode-step
# tests; three alternating rounds at the shapes where the lanes flush (the 512-head shapes) and two
# others; each chain step's times over 64 steps (the flush steps 0 and 32) for both binaries; the
# store's and the service's CUDA tests.
# bundle: BUILD=build BASE_BIN=<kvq-bench of e07e580> bash scripts/device_bundle.sh
set -u
S="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128"
FILTER='*Quantize*:*Flush*:*DecodeSteps*' SUITE=1 VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a \
  timeout 330 bash bench/device_ab.sh 3 kernels --presets innerq,innerq2,innerq_base,kivi2 $S 2>&1 | tail -60
for b in kvq-bench-base kvq-bench; do
  timeout 60 .device/run $b kernels --presets innerq,innerq2,kivi2 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 \
    --qa-steps 64 --chain-dump > $OUT/chain-$b.txt 2>&1; echo "chain $b rc=$?"
  grep -E 'step (0|1|31|32|33):' $OUT/chain-$b.txt
  xz -9 $OUT/chain-$b.txt
done
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -2 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -2 $OUT/service.txt
