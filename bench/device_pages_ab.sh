#!/usr/bin/env bash
# One device call for the InnerQ page units (CudaStepRunner::set_page_units, on by default;
# kvq-bench --no-pages is the same binary without them): the GPU suite and memcheck on the page
# units' test, then alternating runs of kvq-bench --no-pages and kvq-bench --page-min-pages 0 (page
# units wherever they fit).
#   default: one row (against the per-token path) at 1.5 to 24 body pages per resident block, both
#            also without PDL (--no-pdl); NCU=1 adds Nsight Compute's stall samples at (1,32,32,32768);
#   ROWS=1:  2-4 rows (against the IMMA units' warp rings) on the GQA shapes and the real model's.
# Outputs in $OUT/pages.tgz.
# usage (device tool, carry [".device"]): [ROWS=1] OUT=$OUT bash bench/device_pages_ab.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_pages}
ROUNDS=${1:-2}
mkdir -p "$OUT/r"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/r/gpu.txt"
timeout 240 .device/run kernels_gpu_test --gtest_brief=1 > "$OUT/r/gpu_tests.txt" 2>&1
echo "suite rc=$?"; tail -4 "$OUT/r/gpu_tests.txt"
test_filter='*OneRowPages*'
args=(kernels --presets innerq,innerq2 --shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 1,32,32,8192,128
      --shape 1,32,32,16384,128 --shape 16,32,32,4096,128)
variants=("--no-pages" "--page-min-pages 0" "--page-min-pages 0 --no-pdl" "--no-pages --no-pdl")
if [ -n "${ROWS:-}" ]; then
  test_filter='*RowsPages*'
  args=(kernels --presets innerq,innerq2,innerq_base --shape 16,32,8,32768,128 --shape 64,32,8,8192,128
        --shape 1,9,3,8192,64 --shape 4,32,8,8192,128)
  variants=("--no-pages" "--page-min-pages 0")
fi
LD_LIBRARY_PATH=$PWD/.device/lib timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
  .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter="$test_filter" > "$OUT/r/memcheck.txt" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/r/memcheck.txt"
for i in $(seq 1 "$ROUNDS"); do
  for v in "${variants[@]}"; do
    n=$(echo "x$v" | tr -d ' -')
    # shellcheck disable=SC2086
    timeout 100 .device/run kvq-bench "${args[@]}" $v > "$OUT/r/$n.$i.txt" 2>&1
  done
done
for f in "$OUT"/r/x*.txt; do
  echo "== $f"; grep -E "^(1|4|16|64) " "$f" | awk '{print $1","$2","$3","$4, $6, "attn", $7, "copy", $10, "qa_step", $15, $NF}'
done
if [ -n "${NCU:-}" ]; then  # Nsight Compute's stall samples on the page units at (1,32,32,32768)
  OUT=$OUT/r timeout 200 bash bench/ncu_stalls.sh pages 1,32,32,32768,128 innerq > "$OUT/r/ncu_run.txt" 2>&1
  echo "ncu rc=$?"; tail -3 "$OUT/r/ncu_run.txt"
fi
tar czf "$OUT/pages.tgz" -C "$OUT" r && rm -rf "$OUT/r"
