#!/usr/bin/env bash
# KIVI at the short one-row shapes, where the plan keeps the per-token path (fewer than 1,024
# tokens per unit at 2 blocks per SM): the code units (--kivi-min-tokens 0) with the split capped
# at one or two blocks' worth of units per SM (--split-blocks), against the default, in one call.
# Outputs $OUT/ks_<variant>.json (kvq-bench kernels --json).
#
# usage (device tool, carry [".device"]): bash bench/device_kivi_small.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_kivi_small}
mkdir -p "$OUT"
[ -x .device/bin/kvq-bench ] || (cd .device && xz -dc b.txz | tar xf -) || exit 1
shapes=(--shape 1,9,3,8192,64 --shape 1,32,32,4096,128)
run() {  # run NAME FLAGS...
  local name=$1
  shift
  timeout 90 .device/run kvq-bench kernels --json --presets kivi2,kivi4 "${shapes[@]}" "$@" > "$OUT/ks_$name.json" \
    2> "$OUT/ks_$name.err"
  echo "[$name] rc=$?"
}
for rep in 1 2; do
  run "default$rep"
  run "codes$rep" --kivi-min-tokens 0
  run "codes132_$rep" --kivi-min-tokens 0 --split-blocks 132
  run "codes264_$rep" --kivi-min-tokens 0 --split-blocks 264
  run "tokens132_$rep" --split-blocks 132
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "ks_*.json"))):
    try:
        d = json.load(open(f))
    except Exception as e:
        print(os.path.basename(f), "unreadable", e)
        continue
    cells = ["%s %s %.1f us (qa_step %.2f, %s, %d units)" % ((r["b"], r["hq"], r["hkv"], r["t"]), r["preset"],
             r["attn_us"], r["qa_step_us"], r["kernel"], r["units"]) for r in d["rows"]]
    print(os.path.basename(f)); [print("  " + c) for c in cells]
PY
