# Third device call (2026-12-07, twenty-third session): branch lane-quant ff8413a (the lane
# quantizer's passes as loops over shared memory) against main e07e580 (kvq-bench-base) and
# 87ff685 (the same quantizer unrolled in registers, kvq-bench-lq1, call 2). GPU suite and
# memcheck on the quantize-append, flush and decode-step tests; three alternating rounds; each
# chain step's times over 64 steps for ff8413a; the store's and the service's CUDA tests.
# bundle: BUILD=build BASE_BIN=<kvq-bench of e07e580> EXTRA_BINS=<kvq-bench of 87ff685 as kvq-bench-lq1> \
#   bash scripts/device_bundle.sh
set -u
S="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128"
FILTER='*Quantize*:*Flush*:*DecodeSteps*' SUITE=1 VARIANTS="kvq-bench-base;kvq-bench-lq1;kvq-bench" OUT=$OUT/a \
  timeout 360 bash bench/device_ab.sh 3 kernels --presets innerq,innerq2,innerq_base,kivi2 $S 2>&1 | grep -E 'suite|memcheck|PASSED|FAILED|ERROR' | head
timeout 60 .device/run kvq-bench kernels --presets innerq,innerq2,kivi2 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 \
  --qa-steps 64 --chain-dump > $OUT/chain-kvq-bench.txt 2>&1; echo "chain rc=$?"
grep -E 'step (0|1|31|32|33):' $OUT/chain-kvq-bench.txt
xz -9 $OUT/chain-kvq-bench.txt
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -2 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -2 $OUT/service.txt
