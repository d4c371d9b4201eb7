# Eighth device call (2026-12-07, twenty-third session): branch qa-sums de851d2 (the hybrid
# errors summed eight loads at a time in the quantize-append's own kernels) as kvq-bench against
# main (kvq-bench-base: call 7's, built at e6e1f4c; cee4a79 has the same kernels). GPU suite and memcheck on the quantize-append, flush
# and decode-step tests; three alternating rounds; store and service tests.
# bundle: BUILD=build BASE_BIN=<kvq-bench of cee4a79> bash scripts/device_bundle.sh
set -u
S="--shape 1,32,32,4096,128 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 1,32,32,32768,128 --shape 1,9,3,8192,64"
FILTER='*Quantize*:*Flush*:*DecodeSteps*' SUITE=1 VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a \
  timeout 330 bash bench/device_ab.sh 3 kernels --presets innerq2,innerq,kivi2 $S 2>&1 | grep -E 'suite|memcheck|PASSED|FAILED|ERROR' | head
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -1 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -1 $OUT/service.txt
