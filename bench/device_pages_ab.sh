#!/usr/bin/env bash
# One device call for the one-row InnerQ page units (CudaStepRunner::set_page_units, on by
# default; kvq-bench --no-pages is the per-token path of the same binary): the GPU suite and
# memcheck on the new test, then alternating runs of kvq-bench --no-pages and kvq-bench
# --page-min-pages 0 (page units wherever they fit) on one-row InnerQ shapes from 1.5 to 12 body
# pages per resident block (the rule's threshold), both also without PDL (--no-pdl).
# Outputs in $OUT/pages.tgz; NCU=1 adds Nsight Compute's stall samples at (1,32,32,32768).
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_pages_ab.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_pages}
ROUNDS=${1:-2}
mkdir -p "$OUT/r"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/r/gpu.txt"
timeout 240 .device/run kernels_gpu_test --gtest_brief=1 > "$OUT/r/gpu_tests.txt" 2>&1
echo "suite rc=$?"; tail -4 "$OUT/r/gpu_tests.txt"
LD_LIBRARY_PATH=$PWD/.device/lib timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
  .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter='*OneRowPages*' > "$OUT/r/memcheck.txt" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/r/memcheck.txt"
shapes=(--shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 1,32,32,8192,128 --shape 1,32,32,16384,128
        --shape 16,32,32,4096,128)
args=(kernels --presets innerq,innerq2 "${shapes[@]}")
for i in $(seq 1 "$ROUNDS"); do
  timeout 80 .device/run kvq-bench "${args[@]}" --no-pages > "$OUT/r/tokens$i.txt" 2>&1
  timeout 80 .device/run kvq-bench "${args[@]}" --page-min-pages 0 > "$OUT/r/pages$i.txt" 2>&1
  timeout 80 .device/run kvq-bench "${args[@]}" --page-min-pages 0 --no-pdl > "$OUT/r/pages_nopdl$i.txt" 2>&1
  timeout 80 .device/run kvq-bench "${args[@]}" --no-pages --no-pdl > "$OUT/r/tokens_nopdl$i.txt" 2>&1
done
for f in "$OUT"/r/tokens*.txt "$OUT"/r/pages*.txt; do
  echo "== $f"; grep -E "^(1|16) " "$f" | awk '{print $1","$2","$3","$4, $6, $7, $15, $NF}'
done
if [ -n "${NCU:-}" ]; then  # Nsight Compute's stall samples on the page units at (1,32,32,32768)
  OUT=$OUT/r timeout 200 bash bench/ncu_stalls.sh pages 1,32,32,32768,128 innerq > "$OUT/r/ncu_run.txt" 2>&1
  echo "ncu rc=$?"; tail -3 "$OUT/r/ncu_run.txt"
fi
tar czf "$OUT/pages.tgz" -C "$OUT" r && rm -rf "$OUT/r"
