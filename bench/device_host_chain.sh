#!/usr/bin/env bash
# The store's per-layer step from host memory, in one device call: where its time goes, and an
# A/B of the store against a base binary.
#   1. the GPU suite, the store's CUDA backend tests, the service tests' CUDA instances and the
#      step from host memory under compute-sanitizer memcheck (skipped with SUITE=0);
#   2. kvq-bench kernels --host-steps N: RunStepFromHost's host wall time and its phases (prepare,
#      launch, wait) beside the same step's GPU time and the floor of such a chain (the same bytes
#      up, one empty launch, o down, synchronize), on the real model's shape and (1,32,32,32768),
#      then kivi2 and innerq at (64,32,8,8192) and (16,32,8,32768);
#   3. bench/device_store_ab.sh (kvq-bench-store-base against kvq-bench-store), when the base is
#      bundled (scripts/device_bundle.sh with STORE_BENCH=1 BASE_STORE_BIN=...).
# Outputs in $OUT (tests.txt, host.txt, host_batch.txt, store_ab.txt).
#
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_host_chain.sh
#   env: HOST_STEPS (300), PRESETS for step 3 (device_store_ab.sh's default), SUITE (1)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_host_chain}
mkdir -p "$OUT"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SUITE:-1}" = 1 ]; then
  {
    timeout 240 .device/run kernels_gpu_test --gtest_brief=1 2>&1 | tail -4
    timeout 90 .device/run store_cuda_backend_test --gtest_brief=1 2>&1 | tail -3
    timeout 90 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' 2>&1 | tail -3
    # the step from host memory (mapped and copied output, the error flag) under memcheck
    LD_LIBRARY_PATH=$PWD/.device/lib timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
      .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter='*RunStepFromHost*:*QuantizeReportsBadValues*' \
      2>&1 | tail -3
  } | tee "$OUT/tests.txt"
  echo "[suite] at $(( $(date +%s) - t0 ))s"
fi
hs=${HOST_STEPS:-300}
timeout 150 .device/run kvq-bench kernels --host-steps "$hs" --presets fp16,kivi2,innerq,kivi4 \
  --shape 1,9,3,8192,64 --shape 1,32,32,32768,128 > "$OUT/host.txt" 2> "$OUT/host.err"
sed -n '/--host-steps/,$p' "$OUT/host.txt"
# the batched shapes, where the plan's host time grows with the batch (fewer chain steps: the host
# steps are what this measures)
timeout 120 .device/run kvq-bench kernels --host-steps "$hs" --qa-steps 8 --presets kivi2,innerq \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 > "$OUT/host_batch.txt" 2> "$OUT/host_batch.err"
sed -n '/^B .*host_us/,$p' "$OUT/host_batch.txt"
echo "[host] at $(( $(date +%s) - t0 ))s"
if [ -x .device/bin/kvq-bench-store-base ]; then
  OUT="$OUT" bash bench/device_store_ab.sh > /dev/null 2>&1
  cat "$OUT/store_ab.txt"
  echo "[store_ab] at $(( $(date +%s) - t0 ))s"
fi
