#!/usr/bin/env bash
# The store's CUDA step, A/B in one device call: by default kvq-bench-store-base (a kvq-bench-store
# built before a change, bundled with BASE_STORE_BIN by scripts/device_bundle.sh) against the
# bundle's kvq-bench-store, alternating, REPS times per preset, one session of the real model's
# attention shape (30 layers, Hq 9, Hkv 3, D 64) at 8,192 tokens; then one batch-8 run of each
# binary. Prints the decode step and the core-only p50 lines. Outputs in $OUT/store_ab.txt.
#
# usage (device tool, carry [".device"]): bash bench/device_store_ab.sh
#   env: PRESETS (innerq kivi2 fp16), REPS (2), EXTRA (more kvq-bench-store flags for every run),
#        RUNS (';'-separated "BINARY [FLAGS]" variants; default
#              "kvq-bench-store-base;kvq-bench-store")
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_store_ab}
mkdir -p "$OUT"
[ -x .device/bin/kvq-bench-store ] || (cd .device && xz -dc b.txz | tar xf -) || exit 1
PRESETS=${PRESETS:-innerq kivi2 fp16}
REPS=${REPS:-2}
common=(--backend cuda --batch 1 --layers 30 --hq 9 --hkv 3 --head_dim 64 --prefill 8192 --chunk 2048
        --steps 96 --warmup 8 ${EXTRA:-})
IFS=';' read -r -a runs <<< "${RUNS:-kvq-bench-store-base;kvq-bench-store}"
for rep in $(seq "$REPS"); do
  for p in $PRESETS; do
    for r in "${runs[@]}"; do
      read -r -a cmd <<< "$r"
      [ -x ".device/bin/${cmd[0]}" ] || continue
      echo "== $r $p rep $rep"
      timeout 120 .device/run "${cmd[@]}" --preset "$p" "${common[@]}" 2>&1 | grep -E "^decode: step|^core only|failed|error"
    done
  done
done 2>&1 | tee "$OUT/store_ab.txt"
for bin in kvq-bench-store-base kvq-bench-store; do
  [ -x ".device/bin/$bin" ] || continue
  echo "== $bin innerq batch 8" | tee -a "$OUT/store_ab.txt"
  timeout 180 .device/run "$bin" --backend cuda --preset innerq --batch 8 --layers 30 --hq 9 --hkv 3 \
    --head_dim 64 --prefill 8192 --chunk 2048 --steps 32 --warmup 4 2>&1 | tail -4 | tee -a "$OUT/store_ab.txt"
done
