# One device call (2026-12-06, nineteenth session): branches qa-heads (753eaad: the quantize-append's
# own grid with a block count per tensor; kvq-bench-heads) and qa-octets (e232b3a, on qa-heads:
# along-token groups of 32 flushed 8 channels per warp; kvq-bench and the tests) against main
# 6d49fbb (kvq-bench-base): the GPU suite and memcheck on the quantize-append and flush tests, a
# two-round A/B (main; qa-heads; qa-octets; qa-octets with --qa-same-chunks, one count for K and V),
# then the store's CUDA backend and service tests.
# bundle (device_bundle.sh of b3b6cea): BUILD=build BASE_BIN=<kvq-bench of 6d49fbb>
#   EXTRA_BINS=<kvq-bench of 753eaad named kvq-bench-heads> bash scripts/device_bundle.sh
set -u
S5="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 1,9,3,8192,64"
FILTER='*Quantize*:*Flush*:*DecodeSteps*:*CustomConfigs*' SUITE=1 \
  VARIANTS="kvq-bench-base;kvq-bench-heads;kvq-bench;kvq-bench:--qa-same-chunks" OUT=$OUT/a timeout 450 \
  bash bench/device_ab.sh 2 kernels --presets innerq,kivi2 $S5 2>&1 | tail -90
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -2 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -2 $OUT/service.txt
