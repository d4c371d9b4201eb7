#!/usr/bin/env bash
# What a separate quantize-append launch costs a decode step by itself (the device machine, bundle
# from scripts/device_bundle.sh in .device): kvq-bench's chain columns qa_step (the real
# quantize-append in front of the attention) against empty_step (an empty grid of its shape in its
# place), on the one-row, real-model and batched shapes, twice with the plan's launch, once with
# the plain launch (--no-pdl). Writes $OUT/empty{1,2}.json, empty_64.json, empty_nopdl.json and
# prints the columns per row.
# usage (device tool, carry [".device"]): bash bench/device_qa_floor.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_qa_floor}
mkdir -p "$OUT"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
presets=(--presets fp16,kivi2,kivi4,innerq)
shapes=(--shape 1,32,32,4096,128 --shape 1,32,32,32768,128 --shape 16,32,8,32768,128 --shape 1,9,3,8192,64)
for i in 1 2; do
  .device/run kvq-bench kernels --json "${presets[@]}" "${shapes[@]}" > "$OUT/empty$i.json" 2> "$OUT/empty$i.err"
done
.device/run kvq-bench kernels --json "${presets[@]}" --shape 64,32,8,8192,128 > "$OUT/empty_64.json" 2> /dev/null
.device/run kvq-bench kernels --json --no-pdl "${presets[@]}" "${shapes[@]}" --shape 64,32,8,8192,128 \
  > "$OUT/empty_nopdl.json" 2> /dev/null
for f in empty1 empty2 empty_64 empty_nopdl; do
  echo "== $f"
  python3 - "$OUT/$f.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"({r['b']},{r['hq']},{r['hkv']},{r['t']},{r['d']}) {r['preset']:7s} attn {r['attn_us']:7.2f} "
          f"chain attn {r['attn_avg_us']:7.2f} qa_step {r['qa_step_us']:6.2f} empty_step {r['empty_step_us']:6.2f} "
          f"qa_avg {r['qa_avg_us']:6.2f} early {r['early_units']}/{r['units']} {r['kernel']}")
PY
done
