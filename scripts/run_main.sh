#!/usr/bin/env bash
# The README's main job. Runs the full local pipeline (store + worker on the real model) when it is
# built; until then the kernel demo.
set -euo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
if [ -x scripts/run_local.sh ] && [ -x "$BUILD/kvstore/kvq-store" ] && [ -x "$BUILD/worker/kvq-worker" ]; then
  exec bash scripts/run_local.sh "$BUILD"
fi
exec "$BUILD/cmd/kvq-demo/kvq-demo"
