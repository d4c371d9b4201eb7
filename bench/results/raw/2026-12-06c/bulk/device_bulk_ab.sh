#!/usr/bin/env bash
# One device call for the one-row InnerQ bulk ring (CudaStepRunner::set_bulk_ring, kvq-bench
# --bulk): the GPU suite's tests of the one-row paths and memcheck on the new test, then
# alternating runs of kvq-bench-base (the bundle's BASE_BIN), kvq-bench and kvq-bench --bulk on the
# one-row InnerQ shapes. Outputs in $OUT/bulk.tgz.
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_bulk_ab.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_bulk}
ROUNDS=${1:-3}
mkdir -p "$OUT/r"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/r/gpu.txt"
timeout 240 .device/run kernels_gpu_test --gtest_brief=1 > "$OUT/r/gpu_tests.txt" 2>&1
echo "suite rc=$?"; tail -4 "$OUT/r/gpu_tests.txt"
LD_LIBRARY_PATH=$PWD/.device/lib timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
  .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter='*OneRowBulkRing*' > "$OUT/r/memcheck.txt" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/r/memcheck.txt"
shapes=(--shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 16,32,32,4096,128 --shape 1,9,3,8192,64)
args=(kernels --presets innerq,innerq2,innerq_base "${shapes[@]}")
for i in $(seq 1 "$ROUNDS"); do
  timeout 60 .device/run kvq-bench-base "${args[@]}" > "$OUT/r/base$i.txt" 2>&1
  timeout 60 .device/run kvq-bench "${args[@]}" > "$OUT/r/new$i.txt" 2>&1
  timeout 60 .device/run kvq-bench "${args[@]}" --bulk > "$OUT/r/bulk$i.txt" 2>&1
done
for f in "$OUT"/r/base*.txt "$OUT"/r/new*.txt "$OUT"/r/bulk*.txt; do
  echo "== $f"; grep -E "^(1|16) " "$f" | awk '{print $1","$2","$3","$4, $6, $7, $NF}'
done
if [ -n "${NCU:-}" ]; then  # Nsight Compute's stall samples on the bulk ring at (1,32,32,32768)
  OUT=$OUT/r timeout 200 bash bench/ncu_stalls.sh bulk 1,32,32,32768,128 innerq --bulk > "$OUT/r/ncu_run.txt" 2>&1
  echo "ncu rc=$?"; tail -3 "$OUT/r/ncu_run.txt"
  gzip -f "$OUT"/r/bulk.txt 2>/dev/null
fi
tar czf "$OUT/bulk.tgz" -C "$OUT" r && rm -rf "$OUT/r"
