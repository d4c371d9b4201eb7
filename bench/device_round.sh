#!/usr/bin/env bash
# One device call that checks and measures the CUDA kernels: the bundle from
# scripts/device_bundle.sh is unpacked, then, each step bounded so the whole call ends inside the
# device tool's 10-minute limit, in order of importance:
#   1. the GPU suite (kernels_gpu_test), the store's CUDA backend tests and the gRPC service's tests
#      on the CUDA backend;
#   2. kvq-bench kernels --json (every shape and preset, busy timing) and, when bundled,
#      kvq-bench-base on the same shapes (A/B in the same run);
#   3. every shape with each step's flush beside the attention before it (--preflush) against (2),
#      and so with the fused step (--preflush --fused) at the one-row shapes;
#   4. the PyTorch SDPA baseline against (2);
#   5. every shape with the step as two launches (--two-launches) against the fused step (2);
#      with OLD_AB=1 also the earlier A/Bs: the KIVI presets with --kivi-units dequant, kivi4 at one
#      row with --kivi-units codes, the launch overlap off (--no-pdl) on the two long shapes and on
#      (--pdl) on the batched ones;
#   6. compute-sanitizer memcheck on the quantize-append and tensor-core tests;
#      with FLUSH_READ=1 then kvq-bench and SDPA again with the timing buffer read instead of
#      written (kvq-bench --flush read, sdpa_baseline.py --timing busy-read: L2 cold but clean);
#   7. with NCU_MEM="NAME B,Hq,Hkv,T,D PRESET", bench/ncu_stalls.sh --mem on that launch, and with
#      NCU_STALLS (same form) bench/ncu_stalls.sh's full sections and stall samples.
# The whole round stays inside BUDGET seconds (585): a step gets at most what is left, the last
# ones are skipped when nothing is. Outputs land in $OUT (the device tool brings them back):
# gpu.txt, gpu_tests.txt, store_tests.txt, service_tests.txt, kvq.json, base.json, preflush.json, pffused.json,
# kvq_read.json, sdpa_read.txt,
# kdequant.json, kcodes.json, sdpa.txt, nopdl.json, pdl.json, twol.json, memcheck.txt, ncu_mem.txt, packed at the end into $OUT/round.tgz alone (the
# device tool brings back a limited number of files);
# a summary is printed.
#
# LEAN=1 leaves out steps 3 and 5.
# usage (device tool, carry [".device"]): bash bench/device_round.sh [--quick]
#   --quick: the suite and the two long shapes only (a kernel change's first check)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_round}
mkdir -p "$OUT"
quick=0
[ "${1:-}" = "--quick" ] && quick=1
t0=$(date +%s)
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
exec 3>&1  # step reports on the call's own output, whatever the step's output is redirected to
BUDGET=${BUDGET:-585}  # seconds for the whole round: the device tool stops a call at 600
step() {  # step NAME SECONDS COMMAND...: runs it bounded (and within BUDGET), prints its status
  local name=$1 secs=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - t0) ))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 10 ]; then
    echo "[$name] skipped: the round's time is spent" | tee -a "$OUT/steps.txt" >&3
    return 124
  fi
  timeout "$secs" "$@"
  local rc=$?
  echo "[$name] rc=$rc at $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt" >&3
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step gpu_tests 200 .device/run kernels_gpu_test --gtest_brief=1 > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
step store_tests 60 .device/run store_cuda_backend_test --gtest_brief=1 > "$OUT/store_tests.txt" 2>&1
tail -2 "$OUT/store_tests.txt"
if [ -x .device/bin/kvq_store_service_test ]; then  # the gRPC service's tests on the CUDA backend
  step service_tests 60 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' \
    > "$OUT/service_tests.txt" 2>&1
  tail -2 "$OUT/service_tests.txt"
fi
shapes=()
[ $quick = 1 ] && shapes=(--shape 1,32,32,32768,128 --shape 16,32,8,32768,128)
step kvq-bench 140 .device/run kvq-bench kernels --json "${shapes[@]}" > "$OUT/kvq.json" 2> "$OUT/kvq.err"
if [ -x .device/bin/kvq-bench-base ]; then
  step kvq-bench-base 120 .device/run kvq-bench-base kernels --json "${shapes[@]}" > "$OUT/base.json" 2> "$OUT/base.err"
fi
# each chain step's flush written beside the attention of the step before (the chain columns:
# qa_step, step), against (2); at the one-row shapes also as the fused step (one launch + the flush)
if [ "${LEAN:-0}" != 1 ]; then
  step preflush 140 .device/run kvq-bench kernels --json --preflush "${shapes[@]}" > "$OUT/preflush.json" \
    2> "$OUT/preflush.err"
  step preflush-fused 60 .device/run kvq-bench kernels --json --preflush --fused --shape 1,32,32,4096,128 \
    --shape 1,32,32,32768,128 --shape 1,9,3,8192,64 > "$OUT/pffused.json" 2> "$OUT/pffused.err"
fi
if [ "${OLD_AB:-0}" = 1 ]; then
  step kivi-dequant 70 .device/run kvq-bench kernels --json --kivi-units dequant --presets kivi2,kivi4 \
    "${shapes[@]}" > "$OUT/kdequant.json" 2> "$OUT/kdequant.err"
  # one-row 4-bit KIVI on the code units (set_kivi_codes(true)) against its default per-token path
  step kivi4-codes 40 .device/run kvq-bench kernels --json --kivi-units codes --presets kivi4 \
    --shape 1,32,32,4096,128 --shape 1,32,32,32768,128 --shape 16,32,32,4096,128 \
    > "$OUT/kcodes.json" 2> "$OUT/kcodes.err"
fi
if [ $quick = 0 ]; then
  PYTHONUNBUFFERED=1 step sdpa 100 python3 bench/kernels/sdpa_baseline.py --kvq "$OUT/kvq.json" > "$OUT/sdpa.txt" 2>&1
  if [ "${OLD_AB:-0}" = 1 ]; then
    step no-pdl 40 .device/run kvq-bench kernels --json --two-launches --no-pdl --shape 1,32,32,32768,128 \
      --shape 16,32,8,32768,128 > "$OUT/nopdl.json" 2> /dev/null
    # PDL forced on where the plan launches plainly (the batched shapes), against (2)
    step pdl 50 .device/run kvq-bench kernels --json --two-launches --pdl --shape 16,32,32,4096,128 \
      --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 > "$OUT/pdl.json" 2> /dev/null
  fi
  # the quantize-append as its own launch (PDL as the plan picks it) against the fused step of (2)
  [ "${LEAN:-0}" != 1 ] && step two-launches 60 .device/run kvq-bench kernels --json --two-launches > "$OUT/twol.json" 2> /dev/null
  LD_LIBRARY_PATH=$PWD/.device/lib step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
    .device/bin/kernels_gpu_test --gtest_brief=1 \
    --gtest_filter='*Quantize*:*MmaFull*:*ImmaBody*:*KiviMmaBody*:*KiviCodesBody*:*DecodeBatch/kivi*:*TailUnitsWait*:*FlushAfter*:*OneRowPages*:*RowsPages*' \
    > "$OUT/memcheck.txt" 2>&1
  tail -2 "$OUT/memcheck.txt"
  if [ "${FLUSH_READ:-0}" = 1 ]; then  # L2 cold and clean before each timed launch (header)
    step kvq-bench-read 140 .device/run kvq-bench kernels --json --flush read > "$OUT/kvq_read.json" 2> "$OUT/kvq_read.err"
    PYTHONUNBUFFERED=1 step sdpa-read 100 python3 bench/kernels/sdpa_baseline.py --timing busy-read \
      --kvq "$OUT/kvq_read.json" > "$OUT/sdpa_read.txt" 2>&1
  fi
fi
if [ ! -s "$OUT/kvq.json" ]; then
  echo "kvq-bench wrote no table:"; cat "$OUT/kvq.err"
elif [ -s "$OUT/base.json" ]; then
  python3 bench/kernels/render.py "$OUT/kvq.json" --base "$OUT/base.json"
else
  python3 bench/kernels/render.py "$OUT/kvq.json"
fi
if [ -s "$OUT/kdequant.json" ] && [ -s "$OUT/kvq.json" ]; then
  echo "KIVI presets, the default code units (kvq.json) against the dequantizing units (kdequant.json):"
  python3 bench/kernels/render.py "$OUT/kvq.json" --base "$OUT/kdequant.json" | sed -n '/against the base/,$p'
fi
for alt in preflush pffused nopdl pdl twol kvq_read; do
  if [ -s "$OUT/$alt.json" ] && [ -s "$OUT/kvq.json" ]; then
    echo "$alt.json against the plan's launch (kvq.json):"
    python3 bench/kernels/render.py "$OUT/$alt.json" --base "$OUT/kvq.json" | sed -n '/against the base/,$p'
  fi
done
if [ -s "$OUT/kcodes.json" ] && [ -s "$OUT/kvq.json" ]; then
  echo "kivi4 at one row, the code units (kcodes.json) against the default (kvq.json):"
  python3 bench/kernels/render.py "$OUT/kcodes.json" --base "$OUT/kvq.json" | sed -n '/against the base/,$p'
fi
if [ -n "${NCU_MEM:-}" ]; then  # NCU_MEM="NAME B,Hq,Hkv,T,D PRESET": the memory counters of one launch
  # shellcheck disable=SC2086
  OUT=$OUT step ncu-mem 90 bash bench/ncu_stalls.sh --mem $NCU_MEM > "$OUT/ncu_mem.txt" 2>&1
  tail -25 "$OUT/ncu_mem.txt"
fi
if [ -n "${NCU_STALLS:-}" ]; then  # NCU_STALLS="NAME B,Hq,Hkv,T,D PRESET": the full sections and stalls of one launch
  # shellcheck disable=SC2086
  OUT=$OUT step ncu-stalls 150 bash bench/ncu_stalls.sh $NCU_STALLS > "$OUT/ncu_stalls.txt" 2>&1
  tail -10 "$OUT/ncu_stalls.txt"
fi
# everything in one archive: the device tool brings back only a few files per call
(cd "$OUT" && tar czf /tmp/round.tgz ./* && rm -rf ./* && mv /tmp/round.tgz .)
echo "steps (all outputs in round.tgz):"; tar xzf "$OUT/round.tgz" -O ./steps.txt
