# Sixth device call (2026-12-07, twenty-third session): branch qa-kpair (the lane plan's other
# tensor two groups per warp: K in one block per head beside V's lanes, the 512-head flush step in
# one wave) as kvq-bench against main (ff8413a's kvq-bench, the same kernels and host code as main
# e6e1f4c: kvq-bench-base). GPU suite and memcheck on the quantize-append, flush and decode-step
# tests; three alternating rounds; the flush step's trace for kvq-bench; store and service tests.
# bundle: BUILD=build BASE_BIN=<kvq-bench of ff8413a> bash scripts/device_bundle.sh
set -u
S="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128"
FILTER='*Quantize*:*Flush*:*DecodeSteps*' SUITE=1 VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a \
  timeout 330 bash bench/device_ab.sh 3 kernels --presets innerq,innerq2,innerq_base,kivi2 $S 2>&1 | grep -E 'suite|memcheck|PASSED|FAILED|ERROR' | head
timeout 80 .device/run kvq-bench kernels --presets innerq,kivi2 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 \
  --qa-steps 33 --qa-trace --no-check > $OUT/trace-kvq-bench.txt 2>&1; echo "trace rc=$?"
grep -E 'qatrace .* step (0|32) qa' $OUT/trace-kvq-bench.txt | cut -c1-330
xz -9 $OUT/trace-kvq-bench.txt
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -1 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -1 $OUT/service.txt
