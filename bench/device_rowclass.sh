#!/usr/bin/env bash
# The one-row question in one device call (after bench/device_round.sh, same bundle): the one-row
# shapes on the 4- and 8-row kernel instances (kvq-bench --row-class) against the default instance
# of device_round's kvq.json, and Nsight Compute's memory counters (bench/ncu_mem.sh) of fp16 at
# (1,32,32,32768) on both instances and at (16,32,8,32768). Outputs in $OUT/rowclass.tgz.
#
# usage (device tool, carry [".device"]): BUDGET=SECONDS bash bench/device_rowclass.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_rowclass}
W=$(mktemp -d)
t0=$(date +%s)
BUDGET=${BUDGET:-240}
[ -x .device/bin/kvq-bench ] || (cd .device && xz -dc b.txz | tar xf -)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
one_row=(--shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 16,32,32,4096,128 --shape 1,9,3,8192,64)
timeout $(( $(left) > 10 ? $(left) * 2 / 5 : 1 )) .device/run kvq-bench kernels --json --row-class 4 "${one_row[@]}" \
  > "$W/rc4.json" 2> "$W/rc4.err"; echo "[rc4] rc=$? at $(( $(date +%s) - t0 ))s"
python3 bench/kernels/render.py "$W/rc4.json" 2>&1 | head -40
timeout $(( $(left) > 10 ? $(left) / 4 : 1 )) .device/run kvq-bench kernels --json --row-class 8 --shape 1,32,32,32768,128 \
  > "$W/rc8.json" 2> "$W/rc8.err"; echo "[rc8] rc=$? at $(( $(date +%s) - t0 ))s"
python3 bench/kernels/render.py "$W/rc8.json" 2>&1 | head -14
if command -v ncu > /dev/null; then
  for spec in "one_r1 1,32,32,32768,128" "one_r4 1,32,32,32768,128 --row-class 4" "gqa 16,32,8,32768,128"; do
    set -- $spec
    name=$1 shape=$2
    shift 2
    [ "$(left)" -lt 20 ] && { echo "[ncu $name] skipped"; continue; }
    OUT=$W timeout $(( $(left) / 2 )) bash bench/ncu_mem.sh "$name" "$shape" fp16 "$@"
  done
fi
(cd "$W" && tar czf "$OUT/rowclass.tgz" ./*)
rm -rf "$W"
