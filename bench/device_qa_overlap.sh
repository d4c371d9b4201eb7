#!/usr/bin/env bash
# One device call: what the quantize-append adds to a decode step (qa_step) with the one-row InnerQ
# page units against the per-token path, as two launches (PDL), fused into the attention launch
# (--fused) and with the flush after the previous step's attention (--preflush); two rounds. (The
# carveout runs of the same session appended --qa-carveout 100 / 0 to these kvq-bench lines.)
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_qa_overlap.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_qa_overlap}
(cd .device && xz -dc b.txz | tar xf -) || exit 1
mkdir -p "$OUT/r"
args=(kernels --presets innerq --shape 1,32,32,32768,128 --shape 1,32,32,16384,128 --shape 16,32,32,4096,128)
for i in 1 2; do
  for v in "--no-pages" "" "--no-pages --fused" "--fused" "--no-pages --preflush" "--preflush"; do
    n=$(echo "x$v" | tr -d ' -')
    timeout 80 .device/run kvq-bench "${args[@]}" $v > "$OUT/r/$n.$i.txt" 2>&1
    echo "== $v ($i)"; grep -E "^(1|16) " "$OUT/r/$n.$i.txt" | awk '{print $1","$2","$3","$4, $6, "attn", $7, "qapp", $11, "step", $14, "qa_step", $15, $NF}'
  done
done
tar czf "$OUT/carve.tgz" -C "$OUT" r && rm -rf "$OUT/r"
