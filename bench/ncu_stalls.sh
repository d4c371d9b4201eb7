#!/usr/bin/env bash
# Nsight Compute on one decode step's attention kernel (the device machine, bundle from
# scripts/device_bundle.sh unpacked in .device): the full section set, the warp stall reasons per
# issued instruction, and the per-SASS-instruction stall samples as CSV, for one shape and preset.
#
# usage: bash bench/ncu_stalls.sh NAME B,Hq,Hkv,T,D PRESET [kvq-bench flags...]
#   writes $OUT/NAME.log (kvq-bench under ncu), NAME.txt (every section), NAME.stalls.csv (stall
#   reasons per issued instruction) and NAME_sass.csv (the source page, per SASS instruction;
#   scripts/ncu_sass_by_opcode.py sums it by opcode)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/ncu}
mkdir -p "$OUT"
name=$1 shape=$2 preset=$3
shift 3
rep="/tmp/ncu_$name"
ncu --clock-control none -k regex:DecodeKernel -c 1 --set full --import-source no -f -o "$rep" \
  .device/run kvq-bench kernels --shape "$shape" --presets "$preset" --iters 1 --no-check "$@" > "$OUT/$name.log" 2>&1
ncu -i "$rep.ncu-rep" --print-details all > "$OUT/$name.txt" 2>&1
ncu -i "$rep.ncu-rep" --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
  --page raw --csv > "$OUT/$name.stalls.csv" 2>&1
ncu -i "$rep.ncu-rep" --page source --print-source sass --csv > "$OUT/${name}_sass.csv" 2>&1
grep -E "Duration|Issued Warp|Eligible Warps|Registers Per|Achieved Occupancy" "$OUT/$name.txt" | head -8
