#!/usr/bin/env bash
# One device call for an A/B of kvq-bench builds (scripts/device_bundle.sh with BASE_BIN / EXTRA_BINS):
# the GPU suite and memcheck on a test filter first (SUITE=0 skips both), then ROUNDS rounds of
# alternating runs, one per variant. A variant is a bundled binary's name, optionally after
# environment settings and before flags after a colon ("KVQ_X=1 kvq-bench:--stages 3"). Prints each run's rows (shape, preset, attention us, % of
# copy bandwidth, qa_step us, plan) and leaves the raw outputs in $OUT/ab.tgz.
# usage (device tool, carry [".device"]):
#   VARIANTS="kvq-bench-base;kvq-bench;kvq-bench:--stages 3" [FILTER='*Pages*'] OUT=$OUT \
#     bash bench/device_ab.sh ROUNDS kernels --presets innerq --shape 1,32,32,32768,128 ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_ab}
ROUNDS=${1:?usage: device_ab.sh ROUNDS KVQ_BENCH_ARGS...}
shift
mkdir -p "$OUT/r"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/r/gpu.txt"
if [ "${SUITE:-1}" != 0 ]; then
  timeout 240 .device/run kernels_gpu_test --gtest_brief=1 > "$OUT/r/gpu_tests.txt" 2>&1
  echo "suite rc=$?"; tail -3 "$OUT/r/gpu_tests.txt"
  LD_LIBRARY_PATH=$PWD/.device/lib timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
    .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter="${FILTER:-*Pages*}" > "$OUT/r/memcheck.txt" 2>&1
  echo "memcheck rc=$?"; tail -2 "$OUT/r/memcheck.txt"
fi
IFS=';' read -r -a variants <<< "${VARIANTS:?set VARIANTS}"
for i in $(seq 1 "$ROUNDS"); do
  for k in "${!variants[@]}"; do
    v=${variants[$k]}
    read -r -a words <<< "${v%%:*}"
    bin=${words[-1]}
    unset 'words[-1]'
    flags=""
    [[ $v == *:* ]] && flags=${v#*:}
    # shellcheck disable=SC2086
    timeout 100 env "${words[@]}" .device/run "$bin" "$@" $flags > "$OUT/r/v$k.$i.txt" 2>&1
  done
done
for k in "${!variants[@]}"; do
  echo "== v$k: ${variants[$k]}"
  for i in $(seq 1 "$ROUNDS"); do
    grep -E "^[0-9]+ " "$OUT/r/v$k.$i.txt" | awk '{print $1","$2","$3","$4, $6, "attn", $7, "copy", $10, "qa_step", $15, $NF}'
  done | sort -s -k1,2
done
tar czf "$OUT/ab.tgz" -C "$OUT" r && rm -rf "$OUT/r"
