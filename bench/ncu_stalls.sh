#!/usr/bin/env bash
# Nsight Compute on one decode step's attention kernel (the device machine, bundle from
# scripts/device_bundle.sh unpacked in .device): the full section set, the warp stall reasons per
# issued instruction, and the per-SASS-instruction stall samples as CSV, for one shape and preset.
#
# With --mem first, instead: the memory counters (DRAM bytes, L2 sectors / requests from the SMs
# and between the two L2 partitions (ltcfabric) with their hit / miss split, the sectors the L1
# received from the crossbar, the LDGSTS behind them), for two launches that read the same bytes
# at different rates (the one-row question, docs/gpu_notes.md): writes $OUT/NAME.mem.csv (one row
# per metric) and prints each count per DRAM byte.
#
# usage: bash bench/ncu_stalls.sh [--mem] NAME B,Hq,Hkv,T,D PRESET [kvq-bench flags...]
#   writes $OUT/NAME.log (kvq-bench under ncu), NAME.txt (every section), NAME.stalls.csv (stall
#   reasons per issued instruction) and NAME_sass.csv (the source page, per SASS instruction;
#   scripts/ncu_sass_by_opcode.py sums it by opcode)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/ncu}
mkdir -p "$OUT"
mem=0
[ "${1:-}" = "--mem" ] && { mem=1; shift; }
name=$1 shape=$2 preset=$3
shift 3
if [ $mem = 1 ]; then
  metrics='regex:^(dram__bytes_read\.sum|gpu__time_duration\.sum|lts__t_(sectors|requests)_srcunit_(tex|ltcfabric)(_op_read)?(_lookup_(hit|miss))?\.sum|l1tex__m_xbar2l1tex_read_sectors\.sum|l1tex__t_(requests|sectors)_pipe_lsu_mem_global_op_ldgsts\.sum|smsp__inst_executed_op_ldgsts\.sum|lts__t_sectors\.sum|lts__t_requests\.sum)$'
  ncu --clock-control none -k regex:DecodeKernel -c 1 --metrics "$metrics" --csv --page raw \
    .device/run kvq-bench kernels --shape "$shape" --presets "$preset" --iters 1 --no-check "$@" \
    > "$OUT/$name.mem.raw" 2>&1
  python3 - "$OUT/$name.mem.raw" "$OUT/$name.mem.csv" <<'PY'
import csv, io, sys
lines = open(sys.argv[1]).read().splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
if start is None:
    print("no ncu rows:", *lines[-5:], sep="\n")
    sys.exit(0)
rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
head, units, vals = rows[0], rows[1], rows[2]
m = {}
with open(sys.argv[2], "w") as f:
    for h, u, v in zip(head, units, vals):
        f.write(f"{h},{u},{v}\n")
        try:
            m[h] = (float(v.replace(",", "")), u)
        except ValueError:
            pass
def val(k):
    v, u = m.get(k, (float("nan"), ""))
    scale = {"Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "byte": 1, "usecond": 1, "msecond": 1e3, "nsecond": 1e-3}
    return v * scale.get(u, 1)
dram = val("dram__bytes_read.sum")
print(f"{sys.argv[2]}: {val('gpu__time_duration.sum'):.1f} us, DRAM read {dram / 1e6:.1f} MB")
for k in sorted(m):
    if not k.startswith(("lts__", "l1tex__", "smsp__inst")):
        continue
    v = val(k)
    print(f"  {k:70s} {v:14.0f}  {v * 32 / dram if dram else float('nan'):6.3f} x32B/DRAM byte")
PY
  exit 0
fi
rep="/tmp/ncu_$name"
ncu --clock-control none -k regex:DecodeKernel -c 1 --set full --import-source no -f -o "$rep" \
  .device/run kvq-bench kernels --shape "$shape" --presets "$preset" --iters 1 --no-check "$@" > "$OUT/$name.log" 2>&1
ncu -i "$rep.ncu-rep" --print-details all > "$OUT/$name.txt" 2>&1
ncu -i "$rep.ncu-rep" --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
  --page raw --csv > "$OUT/$name.stalls.csv" 2>&1
ncu -i "$rep.ncu-rep" --page source --print-source sass --csv > "$OUT/${name}_sass.csv" 2>&1
grep -E "Duration|Issued Warp|Eligible Warps|Registers Per|Achieved Occupancy" "$OUT/$name.txt" | head -8
