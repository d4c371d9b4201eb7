# Fifth device call (2026-12-07, twenty-third session): branch lane-quant 486777d (
# both hybrid candidates in one pass, lane instances at 64 registers) as kvq-bench, against
# main e07e580 (kvq-bench-base), ff8413a (loops over shared memory, call 3: kvq-bench-lq2) and
# the new code without the 64-register bound (kvq-bench-nolb, 80 registers). GPU suite and memcheck
# on the quantize-append, flush and decode-step tests; three alternating rounds; the flush step's
# trace (--qa-trace, 33 steps) for kvq-bench; the store's and the service's CUDA tests.
# bundle: BUILD=build BASE_BIN=<kvq-bench of e07e580> EXTRA_BINS="<ff8413a's as kvq-bench-lq2>
#   <this build without the bound as kvq-bench-nolb>" bash scripts/device_bundle.sh
set -u
S="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128"
FILTER='*Quantize*:*Flush*:*DecodeSteps*' SUITE=1 VARIANTS="kvq-bench-base;kvq-bench-lq2;kvq-bench-nolb;kvq-bench" OUT=$OUT/a \
  timeout 400 bash bench/device_ab.sh 3 kernels --presets innerq,innerq2,innerq_base,kivi2 $S 2>&1 | grep -E 'suite|memcheck|PASSED|FAILED|ERROR' | head
timeout 80 .device/run kvq-bench kernels --presets innerq,kivi2 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 \
  --qa-steps 33 --qa-trace --no-check > $OUT/trace-kvq-bench.txt 2>&1; echo "trace rc=$?"
grep -E 'qatrace .* step (0|32) qa' $OUT/trace-kvq-bench.txt | cut -c1-330
xz -9 $OUT/trace-kvq-bench.txt
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -1 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -1 $OUT/service.txt
