# Second device call (2026-12-07, twenty-first session): branch qa-merged (the quantize-append of a
# one-token decode step as one block per (sequence, KV head), DevQaHead addresses from the host)
# against main a1ffac8 (kvq-bench-base): the GPU suite and memcheck on the quantize-append, flush
# and decode-step tests, a two-round A/B (main; the branch with its default, 2 warps; --qa-head 4;
# --qa-head off), the quantize-append trace at (16,32,32,4096) innerq with 2 warps and off, then
# the store's CUDA backend and service tests (the default on).
# bundle: BUILD=build BASE_BIN=<kvq-bench of a1ffac8> bash scripts/device_bundle.sh
set -u
S6="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 1,9,3,8192,64"
FILTER='*Quantize*:*Flush*:*DecodeSteps*:*CustomConfigs*' SUITE=1 \
  VARIANTS="kvq-bench-base;kvq-bench;kvq-bench:--qa-head 4;kvq-bench:--qa-head off" OUT=$OUT/a timeout 420 \
  bash bench/device_ab.sh 2 kernels --presets innerq,kivi2 $S6 2>&1 | tail -100
for h in 2 off; do
  timeout 40 .device/run kvq-bench kernels --presets innerq --shape 16,32,32,4096,128 --qa-steps 32 --qa-trace \
    --qa-head $h > $OUT/trace_$h.txt 2>&1
  echo "trace $h rc=$?"; grep 'mean over' $OUT/trace_$h.txt
done
xz -9 $OUT/trace_*.txt
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -2 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -2 $OUT/service.txt
