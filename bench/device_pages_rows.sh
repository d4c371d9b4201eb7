#!/usr/bin/env bash
# One device call for the page units with 2-4 rows (the IMMA units' tiles from the block's page
# ring): the GPU suite, memcheck of RowsPages, then alternating runs of kvq-bench --no-pages (the
# IMMA units' warp rings) and kvq-bench --page-min-pages 0 on the GQA shapes and the real model's.
# Outputs in $OUT/rows.tgz.
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_pages_rows.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_pages_rows}
ROUNDS=${1:-2}
mkdir -p "$OUT/r"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/r/gpu.txt"
timeout 240 .device/run kernels_gpu_test --gtest_brief=1 > "$OUT/r/gpu_tests.txt" 2>&1
echo "suite rc=$?"; tail -3 "$OUT/r/gpu_tests.txt"
LD_LIBRARY_PATH=$PWD/.device/lib timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
  .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter='*RowsPages*' > "$OUT/r/memcheck.txt" 2>&1
echo "memcheck rc=$?"; tail -2 "$OUT/r/memcheck.txt"
args=(kernels --presets innerq,innerq2,innerq_base --shape 16,32,8,32768,128 --shape 64,32,8,8192,128
      --shape 1,9,3,8192,64 --shape 4,32,8,8192,128)
for i in $(seq 1 "$ROUNDS"); do
  timeout 100 .device/run kvq-bench "${args[@]}" --no-pages > "$OUT/r/imma$i.txt" 2>&1
  timeout 100 .device/run kvq-bench "${args[@]}" --page-min-pages 0 > "$OUT/r/pages$i.txt" 2>&1
done
for f in "$OUT"/r/imma*.txt "$OUT"/r/pages*.txt; do
  echo "== $f"; grep -E "^(1|4|16|64) " "$f" | awk '{print $1","$2","$3","$4, $6, "attn", $7, "copy", $10, "qa_step", $15, $NF}'
done
tar czf "$OUT/rows.tgz" -C "$OUT" r && rm -rf "$OUT/r"
