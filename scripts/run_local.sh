#!/usr/bin/env bash
# The README's main job, locally: fetches the real model (SmolLM2-135M-Instruct, GGUF), starts
# kvq-store and kvq-worker on loopback, asks the model a question about a passage streamed to the
# terminal, prints what the session's KV cache took in the store (stored bytes against the same
# tokens as fp16), and stops both.
#
#   bash scripts/run_local.sh [BUILD_DIR]        (PRESET=innerq|kivi2|kivi4|fp16|..., MAX_TOKENS=96,
#                                                 QUESTION="...", STORE_BACKEND=auto|cpu|cuda,
#                                                 TIMINGS=1: the worker's step and store round-trip
#                                                 means from its metrics after the answer)
set -euo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
PRESET=${PRESET:-innerq}
MAX_TOKENS=${MAX_TOKENS:-96}
STORE_BACKEND=${STORE_BACKEND:-auto}
QUESTION=${QUESTION:-"Who wants Mr. Bennet to visit Mr. Bingley, and why?"}
for bin in "$BUILD/kvstore/kvq-store" "$BUILD/worker/kvq-worker" "$BUILD/tools/kvq"; do
  [ -x "$bin" ] || { echo "run_local: $bin is not built (make build)" >&2; exit 1; }
done

MODEL=$(bash scripts/fetch_model.sh)
echo "run_local: model $MODEL"
LOGS=$(mktemp -d)
STORE_PID=""; WORKER_PID=""
cleanup() {
  [ -n "$WORKER_PID" ] && kill "$WORKER_PID" 2>/dev/null && wait "$WORKER_PID" 2>/dev/null || true
  [ -n "$STORE_PID" ] && kill "$STORE_PID" 2>/dev/null && wait "$STORE_PID" 2>/dev/null || true
  rm -rf "$LOGS"
}
trap cleanup EXIT

# Waits until a log has a line matching $2 and prints the number after $3 on it.
wait_port() {
  local log=$1 pattern=$2 after=$3 pid=$4
  for _ in $(seq 1 600); do
    if grep -q "$pattern" "$log" 2>/dev/null; then
      grep "$pattern" "$log" | head -n1 | grep -o "${after}[0-9]*" | head -n1 | grep -o '[0-9]*$'
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { echo "run_local: process exited:" >&2; cat "$log" >&2; return 1; }
    sleep 0.1
  done
  echo "run_local: timed out waiting for '$pattern' in $log" >&2; cat "$log" >&2; return 1
}

"$BUILD/kvstore/kvq-store" --host 127.0.0.1 --port 0 --metrics_port 0 --backend "$STORE_BACKEND" \
  --pool_bytes $((512 << 20)) > "$LOGS/store.log" 2>&1 &
STORE_PID=$!
STORE_PORT=$(wait_port "$LOGS/store.log" "grpc port" "grpc port " "$STORE_PID")
echo "run_local: kvq-store on 127.0.0.1:$STORE_PORT ($(grep -o 'backend [a-z]*' "$LOGS/store.log" | head -n1))"

WORKER_METRICS=0  # off, unless TIMINGS=1 (then a free port)
if [ "${TIMINGS:-0}" = 1 ]; then
  WORKER_METRICS=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
"$BUILD/worker/kvq-worker" --host 127.0.0.1 --port 0 --metrics_port "$WORKER_METRICS" --store "127.0.0.1:$STORE_PORT" \
  --model "$MODEL" --default_preset "$PRESET" > "$LOGS/worker.log" 2>&1 &
WORKER_PID=$!
WORKER_PORT=$(wait_port "$LOGS/worker.log" "serving on" "serving on 127.0.0.1:" "$WORKER_PID")
echo "run_local: kvq-worker on 127.0.0.1:$WORKER_PORT ($(grep -o 'compute [a-z]*' "$LOGS/worker.log" | head -n1)), KV preset $PRESET"

PASSAGE=$(cat <<'PASSAGE_EOF'
It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his
first entering a neighbourhood, this truth is so well fixed in the minds
of the surrounding families, that he is considered the rightful property
of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that
Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she
told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"_You_ want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken
by a young man of large fortune from the north of England; that he came
down on Monday in a chaise and four to see the place, and was so much
delighted with it, that he agreed with Mr. Morris immediately; that he
is to take possession before Michaelmas, and some of his servants are to
be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! Single, my dear, to be sure! A single man of large fortune; four or
five thousand a year. What a fine thing for our girls!"

"How so? How can it affect them?"

"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You
must know that I am thinking of his marrying one of them."

"Is that his design in settling here?"

"Design! Nonsense, how can you talk so! But it is very likely that he
_may_ fall in love with one of them, and therefore you must visit him as
soon as he comes."

"I see no occasion for that. You and the girls may go, or you may send
them by themselves, which perhaps will be still better, for as you are
as handsome as any of them, Mr. Bingley may like you the best of the
party."

"My dear, you flatter me. I certainly _have_ had my share of beauty, but
I do not pretend to be anything extraordinary now. When a woman has five
grown-up daughters, she ought to give over thinking of her own beauty."

"In such cases, a woman has not often much beauty to think of."
PASSAGE_EOF
)
PROMPT="Read this passage from Pride and Prejudice (Jane Austen, 1813):

$PASSAGE

$QUESTION"
echo
echo "> $QUESTION"
echo
"$BUILD/tools/kvq" generate --worker "127.0.0.1:$WORKER_PORT" --chat --prompt "$PROMPT" \
  --max_tokens "$MAX_TOKENS" --preset "$PRESET" --usage
if [ "${TIMINGS:-0}" = 1 ]; then  # where a token's time went, from the worker's histograms
  python3 - "$WORKER_METRICS" <<'PY'
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
def stat(name):
    s = re.search(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)", text, re.M)
    c = re.search(rf"^{name}_count(?:{{[^}}]*}})? (\S+)", text, re.M)
    return (float(s.group(1)), float(c.group(1))) if s and c else (0.0, 0.0)
for name, what in (("kvq_worker_step_duration_seconds", "forward step"),
                   ("kvq_worker_store_round_trip_seconds", "store round trip (one layer)"),
                   ("kvq_worker_inter_token_latency_seconds", "between two tokens")):
    total, n = stat(name)
    if n:
        print(f"run_local: {what}: {n:.0f} x {1e3 * total / n:.3f} ms (mean), {total:.3f} s in all")
PY
fi
