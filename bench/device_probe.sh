#!/usr/bin/env bash
# One device call that separates what sets the one-row fp16 time and the small shape's times
# (docs/gpu_notes.md, "Next device session: the one-row fp16 question"), on the bundle from
# scripts/device_bundle.sh. Runs, each bounded, in order of importance:
#   geo      fp16 at four geometries of the same bytes (units per item, page size, length);
#   split_N  fp16 at (1,32,32,32768) with --split-blocks N;
#   stages_N fp16 at (1,32,32,32768) and (16,32,8,32768) with --stages N;
#   small_*  (1,9,3,8192) D=64: kivi2 / kivi4 on the code units (--kivi-min-tokens 0), innerq with
#            --split-blocks 132 / 264 / 396;
#   nopdl    the whole default table with --no-pdl (the launch overlap off), against pdl, the same
#            table with it on, in the same call: the two recorded rounds saw PDL add 20-30 us to the
#            whole step at (16,32,8,32768) for every quantized preset and save ~2 us at one row;
#   spread   the whole table with PDL and --spread-blocks (at most ceil(units / SMs) blocks per
#            SM in a one-wave launch);
#   ncu      Nsight Compute (bench/ncu_stalls.sh) of fp16 at (1,32,32,32768) and (16,32,8,32768).
# Every kvq-bench run writes $OUT/NAME.json; all outputs are packed into $OUT/probe.tgz and a
# summary (attention time and bandwidth per row) is printed.
#
# usage (device tool, carry [".device"]): bash bench/device_probe.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_probe}
mkdir -p "$OUT"
t0=$(date +%s)
[ -x .device/bin/kvq-bench ] || (cd .device && xz -dc b.txz | tar xf -) ||
  { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
BUDGET=${BUDGET:-585}
bench() {  # bench NAME SECONDS kvq-bench-flags...: one bounded kvq-bench run into $OUT/NAME.json
  local name=$1 secs=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - t0) ))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 10 ]; then
    echo "[$name] skipped: the call's time is spent"
    return
  fi
  timeout "$secs" .device/run kvq-bench kernels --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  local rc=$?
  [ $rc = 0 ] || echo "[$name] rc=$rc: $(tail -2 "$OUT/$name.err")"
  python3 - "$name" "$OUT/$name.json" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    d = json.load(open(path))
except Exception as e:
    print(f"[{name}] no table ({e})"); sys.exit(0)
for r in d["rows"]:
    print(f"[{name}] {r['b']},{r['hq']},{r['hkv']},{r['t']},{r['d']} {r['preset']:<8} attn {r['attn_us']:8.2f} us "
          f"{r['gbps']:7.1f} GB/s {100 * r['copy_frac']:5.1f}% copy qa {r['qa_us']:5.2f}/{r['qa_avg_us']:5.2f} step {r['step_us']:8.2f} units {r['units']} "
          f"chunk {r['chunk']} err {r['err']:.1e} {r['kernel']}")
EOF
}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
one=(--shape 1,32,32,32768,128)
gqa=(--shape 16,32,8,32768,128)
bench pdl 60
bench nopdl 60 --no-pdl
bench spread 60 --spread-blocks
bench geo 60 --presets fp16 "${one[@]}" --shape 4,32,32,8192,128 --shape 4,8,8,32768,128 \
  --shape 1,8,8,131072,128 "${gqa[@]}"
for n in 128 132 264 396 528; do bench "split_$n" 25 --presets fp16 --split-blocks $n "${one[@]}"; done
for s in 2 3; do bench "stages_$s" 30 --presets fp16 --stages $s "${one[@]}" "${gqa[@]}"; done
small=(--shape 1,9,3,8192,64)
bench small_default 40 "${small[@]}"
bench small_kivicodes 30 --presets kivi2,kivi4 --kivi-min-tokens 0 "${small[@]}"
for n in 132 264 396; do bench "small_innerq_$n" 20 --presets innerq,fp16 --split-blocks $n "${small[@]}"; done
left=$(( BUDGET - ($(date +%s) - t0) ))
if command -v ncu > /dev/null && [ $left -gt 150 ]; then
  OUT=$OUT timeout $(( left / 2 - 5 )) bash bench/ncu_stalls.sh one_fp16 1,32,32,32768,128 fp16
  left=$(( BUDGET - ($(date +%s) - t0) ))
  [ $left -gt 40 ] && OUT=$OUT timeout $(( left - 15 )) bash bench/ncu_stalls.sh gqa_fp16 16,32,8,32768,128 fp16
  for n in one_fp16 gqa_fp16; do
    [ -s "$OUT/$n.txt" ] && grep -E "DRAM Throughput|Memory Throughput|L2 Hit Rate|L1/TEX Hit Rate|Duration|Achieved Occupancy|Mem Busy|Max Bandwidth" "$OUT/$n.txt" | sed "s/^/[$n] /" | head -12
  done
fi
(cd "$OUT" && tar czf /tmp/probe.tgz ./* && rm -rf ./* && mv /tmp/probe.tgz .)
echo "probe done at $(( $(date +%s) - t0 ))s (outputs in probe.tgz)"
