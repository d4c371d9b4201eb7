#!/usr/bin/env bash
# One device call for the page units' rule with 2-4 rows: kvq-bench --no-pages against
# --page-min-pages 0 at 20 and 41 body pages per resident block (per-token instance: 3 per SM),
# then the default rule on the GQA shapes (it must pick pages at 80, the IMMA units at 5 and 0.4).
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_pages_threshold.sh
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_pages_threshold}
set -uo pipefail
(cd .device && xz -dc b.txz | tar xf -) || exit 1
mkdir -p "$OUT/r"
args=(kernels --presets innerq,innerq_base --shape 16,32,8,8192,128 --shape 16,32,8,16384,128 --shape 8,32,8,32768,128)
for i in 1 2; do
  timeout 100 .device/run kvq-bench "${args[@]}" --no-pages > "$OUT/r/imma$i.txt" 2>&1
  timeout 100 .device/run kvq-bench "${args[@]}" --page-min-pages 0 > "$OUT/r/pages$i.txt" 2>&1
done
timeout 100 .device/run kvq-bench kernels --presets innerq --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 --shape 4,32,8,8192,128 --shape 1,9,3,8192,64 > "$OUT/r/default.txt" 2>&1
for f in "$OUT"/r/*.txt; do
  echo "== $f"; grep -E "^(1|4|8|16|64) " "$f" | awk '{print $1","$2","$3","$4, $6, "attn", $7, "copy", $10, "qa_step", $15, $NF}'
done
tar czf "$OUT/rows2.tgz" -C "$OUT" r && rm -rf "$OUT/r"
