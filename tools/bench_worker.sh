#!/usr/bin/env bash
# Throughput of the worker through a local kvq-store on the real model: N concurrent requests
# (greedy, fixed prompt, MAX_TOKENS each, ignore_eos), for N in $CONCURRENCY. Prints one line per N:
# wall time, generated tokens/s over all requests, mean time to first token.
#   bash tools/bench_worker.sh [BUILD_DIR]    (PRESET=innerq CONCURRENCY="1 4 8" MAX_TOKENS=64)
set -euo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
PRESET=${PRESET:-innerq}
CONCURRENCY=${CONCURRENCY:-"1 4 8"}
MAX_TOKENS=${MAX_TOKENS:-64}
MODEL=$(bash scripts/fetch_model.sh)
LOGS=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$LOGS"; }
trap cleanup EXIT
touch "$LOGS/store.log" "$LOGS/worker.log"
"$BUILD/kvstore/kvq-store" --host 127.0.0.1 --port 0 --metrics_port -1 --backend "${STORE_BACKEND:-cpu}" \
  --pool_bytes $((1 << 30)) > "$LOGS/store.log" 2>&1 &
for _ in $(seq 1 100); do grep -q "grpc port" "$LOGS/store.log" && break; sleep 0.1; done
SP=$(grep -o "grpc port [0-9]*" "$LOGS/store.log" | grep -o "[0-9]*$")
"$BUILD/worker/kvq-worker" --host 127.0.0.1 --port 0 --metrics_port 0 --store "127.0.0.1:$SP" --model "$MODEL" \
  --default_preset "$PRESET" > "$LOGS/worker.log" 2>&1 &
for _ in $(seq 1 300); do grep -q "serving on" "$LOGS/worker.log" && break; sleep 0.1; done
WP=$(grep -o "serving on 127.0.0.1:[0-9]*" "$LOGS/worker.log" | grep -o "[0-9]*$")
PROMPT="Write a long story about a lighthouse keeper who finds a message in a bottle."
echo "preset $PRESET, $MAX_TOKENS tokens per request, $(nproc) cores"
for n in $CONCURRENCY; do
  start=$(date +%s.%N)
  for i in $(seq 1 "$n"); do
    "$BUILD/tools/kvq" generate --worker "127.0.0.1:$WP" --chat --prompt "$PROMPT ($i)" --max_tokens "$MAX_TOKENS" \
      --ignore_eos --usage > /dev/null 2> "$LOGS/r$n.$i" &
  done
  wait $(jobs -p | tail -n "$n") 2>/dev/null || true
  end=$(date +%s.%N)
  ttft=$(grep -ho "time to first token [0-9.]*" "$LOGS"/r$n.* | awk '{s+=$5} END {printf "%.3f", s/NR}')
  awk -v n="$n" -v t="$MAX_TOKENS" -v a="$start" -v b="$end" -v f="$ttft" \
    'BEGIN {printf "concurrency %2d: wall %.2f s, %.1f generated tokens/s in all, mean time to first token %s s\n", n, b-a, n*t/(b-a), f}'
done
