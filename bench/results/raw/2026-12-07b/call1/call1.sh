# First device call (2026-12-07, twenty-first session): main at a1ffac8 (quantize-append lanes only
# where one group per warp takes more than kQaLaneWaves waves; K and V their own block counts) against
# 999b2f0 (kvq-bench-base, before the lanes): the GPU suite and memcheck on the quantize-append, flush
# and decode-step tests, a two-round A/B (999b2f0; a1ffac8, lanes auto; a1ffac8 with --qa-lanes off),
# then the store's CUDA backend and service tests. This is the twentieth session's call 2, which
# never ran.
# bundle: BUILD=build BASE_BIN=<kvq-bench of 999b2f0> bash scripts/device_bundle.sh
set -u
S6="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 1,9,3,8192,64"
FILTER='*Quantize*:*Flush*:*DecodeSteps*:*CustomConfigs*' SUITE=1 \
  VARIANTS="kvq-bench-base;kvq-bench;kvq-bench:--qa-lanes off" OUT=$OUT/a timeout 480 \
  bash bench/device_ab.sh 2 kernels --presets innerq,kivi2 $S6 2>&1 | tail -80
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -2 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -2 $OUT/service.txt
