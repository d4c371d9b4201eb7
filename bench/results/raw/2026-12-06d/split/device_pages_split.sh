#!/usr/bin/env bash
# One short device call: the page-unit tests, then alternating runs of kvq-bench-base (the bundle's
# BASE_BIN: page rings refilled a whole page at a time) and kvq-bench (K and V runs refilled apart)
# on the shapes that take page units. Outputs in $OUT/split.tgz.
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_pages_split.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_pages_split}
ROUNDS=${1:-2}
mkdir -p "$OUT/r"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/r/gpu.txt"
timeout 60 .device/run kernels_gpu_test --gtest_brief=1 --gtest_filter='*Pages*:*ImmaBody*' > "$OUT/r/tests.txt" 2>&1
echo "tests rc=$?"; tail -1 "$OUT/r/tests.txt"
args=(kernels --presets innerq --no-check --shape 1,32,32,32768,128 --shape 1,32,32,16384,128 --shape 16,32,32,4096,128
      --shape 16,32,8,32768,128 --shape 64,32,8,8192,128)
for i in $(seq 1 "$ROUNDS"); do
  timeout 40 .device/run kvq-bench-base "${args[@]}" > "$OUT/r/base$i.txt" 2>&1
  timeout 40 .device/run kvq-bench "${args[@]}" > "$OUT/r/split$i.txt" 2>&1
done
for f in "$OUT"/r/base*.txt "$OUT"/r/split*.txt; do
  echo "== $f"; grep -E "^(1|16|64) " "$f" | awk '{print $1","$2","$3","$4, "attn", $7, "qa_step", $15, $NF}'
done
tar czf "$OUT/split.tgz" -C "$OUT" r && rm -rf "$OUT/r"
