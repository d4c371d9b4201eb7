#!/usr/bin/env bash
# One device call: the InnerQ instances' smaller static shared memory (DecSmem without the KIVI
# tiles' work areas) against main's kvq-bench, and the one-row page instance capped at 6 blocks per
# SM (80 registers) as a third binary. The GPU suite and memcheck on the page tests first, then
# alternating runs of the three kvq-bench binaries on the page units' shapes (attention and the
# quantize-append's share of a step).
# Bundle: NO_STORE_TESTS=1 BASE_BIN=<main's kvq-bench> EXTRA_BINS=<kvq-bench-b6> scripts/device_bundle.sh
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_slim_ab.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_slim}
ROUNDS=${1:-3}
mkdir -p "$OUT/r"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/r/gpu.txt"
timeout 240 .device/run kernels_gpu_test --gtest_brief=1 > "$OUT/r/gpu_tests.txt" 2>&1
echo "suite rc=$?"; tail -4 "$OUT/r/gpu_tests.txt"
LD_LIBRARY_PATH=$PWD/.device/lib timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
  .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter='*Pages*' > "$OUT/r/memcheck.txt" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/r/memcheck.txt"
args=(kernels --presets innerq --shape 1,32,32,32768,128 --shape 1,32,32,16384,128 --shape 1,32,32,8192,128
      --shape 16,32,32,4096,128 --shape 16,32,8,32768,128 --shape 64,32,8,8192,128)
for i in $(seq 1 "$ROUNDS"); do
  for b in kvq-bench-base kvq-bench kvq-bench-b6; do
    timeout 100 .device/run "$b" "${args[@]}" > "$OUT/r/$b.$i.txt" 2>&1
  done
done
for f in "$OUT"/r/kvq-bench*.txt; do
  echo "== $f"; grep -E "^(1|4|16|64) " "$f" | awk '{print $1","$2","$3","$4, $6, "attn", $7, "copy", $10, "qa_step", $15, $NF}'
done
tar czf "$OUT/slim.tgz" -C "$OUT" r && rm -rf "$OUT/r"
