#!/usr/bin/env bash
# The one-row question in one device call (after bench/device_round.sh, same bundle): the rings at
# the old placement (--ring-offset 48: 48 bytes past a 128-byte line, as the one-row instance had
# them before the dynamic shared memory was declared 128-byte aligned) on the one-row shapes and
# (16,32,8,32768); the one-row shapes on the 4- and 8-row kernel instances (--row-class); all
# against device_round's kvq.json; and Nsight Compute's memory counters (bench/ncu_stalls.sh --mem) of fp16
# at (1,32,32,32768) aligned and at the old offset, and at (16,32,8,32768). Outputs in
# $OUT/rowclass.tgz.
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
timeout $(( $(left) > 10 ? $(left) / 3 : 1 )) .device/run kvq-bench kernels --json --ring-offset 48 "${one_row[@]}" \
  --shape 16,32,8,32768,128 > "$W/ro48.json" 2> "$W/ro48.err"; echo "[ro48] rc=$? at $(( $(date +%s) - t0 ))s"
python3 bench/kernels/render.py "$W/ro48.json" 2>&1 | head -40
timeout $(( $(left) > 10 ? $(left) / 3 : 1 )) .device/run kvq-bench kernels --json --row-class 4 "${one_row[@]}" \
  > "$W/rc4.json" 2> "$W/rc4.err"; echo "[rc4] rc=$? at $(( $(date +%s) - t0 ))s"
python3 bench/kernels/render.py "$W/rc4.json" 2>&1 | head -40
timeout $(( $(left) > 10 ? $(left) / 4 : 1 )) .device/run kvq-bench kernels --json --row-class 8 --shape 1,32,32,32768,128 \
  > "$W/rc8.json" 2> "$W/rc8.err"; echo "[rc8] rc=$? at $(( $(date +%s) - t0 ))s"
python3 bench/kernels/render.py "$W/rc8.json" 2>&1 | head -14
if command -v ncu > /dev/null; then
  for spec in "one 1,32,32,32768,128" "one_o48 1,32,32,32768,128 --ring-offset 48" "gqa 16,32,8,32768,128"; do
    set -- $spec
    name=$1 shape=$2
    shift 2
    [ "$(left)" -lt 20 ] && { echo "[ncu $name] skipped"; continue; }
    OUT=$W timeout $(( $(left) / 2 )) bash bench/ncu_stalls.sh --mem "$name" "$shape" fp16 "$@"
  done
fi
(cd "$W" && tar czf "$OUT/rowclass.tgz" ./*)
rm -rf "$W"
