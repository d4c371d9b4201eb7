#!/usr/bin/env bash
# Static instruction counts of the decode kernels' tile loops, for kernel work without a GPU:
# compiles one kernels/cuda/*.cu for sm_90 with ptxas statistics (registers, spills, static
# shared memory per instance), disassembles it with cuobjdump (PyPI's nvidia-cuda-cuobjdump and
# nvidia-cuda-nvdisasm wheels, fetched once into ~/.cache/kvq; the CUDA toolkit here has neither)
# and prints, per kernel
# instance whose name matches FILTER, every loop with at least 8 tensor-core instructions: its
# instructions (each executes once per tile, except branches taken only sometimes, such as the
# staging of the ring), the HMMA / IMMA count, spill loads and stores, shared stores and ldmatrix.
# A static count, not a measurement: compare instances and versions with it, time them on a GPU.
#
# usage: scripts/sass_tile_loops.sh [FILE.cu] [FILTER]
#   scripts/sass_tile_loops.sh kernels/cuda/decode_f16_d128.cu 'ILi4ELi42ELb1'   # KIVI code units, 4 rows
#   TOP=30 scripts/sass_tile_loops.sh ...   # the 30 most frequent opcodes per loop (8 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-kernels/cuda/decode_f16_d128.cu}
filter=${2:-DecodeKernel}
cache=${HOME}/.cache/kvq
cuobjdump=$cache/nvidia/cu13/bin/cuobjdump
if [ ! -x "$cuobjdump" ] || [ ! -x "$cache/nvidia/cu13/bin/nvdisasm" ]; then
  mkdir -p "$cache/wheel"
  pip download --no-deps -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm -d "$cache/wheel"
  for w in "$cache"/wheel/nvidia_cuda_cuobjdump-*.whl "$cache"/wheel/nvidia_cuda_nvdisasm-*.whl; do
    unzip -qo "$w" -d "$cache"
  done
  chmod +x "$cuobjdump" "$cache/nvidia/cu13/bin/nvdisasm"
fi
export PATH="$cache/nvidia/cu13/bin:$PATH"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/local/cuda/bin/nvcc -O3 -DNDEBUG -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -std=c++17 \
  -Ikernels/include -Ikernels -Ikernels/cuda -Xptxas -v -c "$src" -o "$tmp/k.o" 2> "$tmp/ptxas.txt"
"$cuobjdump" -sass "$tmp/k.o" > "$tmp/k.sass"
python3 - "$tmp/ptxas.txt" "$tmp/k.sass" "$filter" <<'EOF'
import collections, os, re, sys

ptxas_txt, sass_txt, filt = sys.argv[1], sys.argv[2], sys.argv[3]
stats, cur = {}, None
for line in open(ptxas_txt):
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        cur = m.group(1)
        stats[cur] = {}
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and cur:
        stats[cur]["spill"] = f"{m.group(1)}/{m.group(2)}"
    m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
    if m and cur:
        stats[cur]["regs"], stats[cur]["smem"] = m.group(1), m.group(2)

funcs, name = {}, None
for line in open(sass_txt):
    m = re.match(r"\s*Function : (\S+)", line)
    if m:
        name = m.group(1)
        funcs[name] = []
        continue
    m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*(.*?);", line)
    if m and name:
        funcs[name].append((int(m.group(1), 16), m.group(3), m.group(4)))

def short(n):  # template arguments of DecodeKernel<D, DT, R, PATHS, IMMA>
    m = re.search(r"DecodeKernelILi(\d+)ELNS_5DTypeE(\d)ELi(\d+)ELi(\d+)ELb(\d)", n)
    return f"D={m.group(1)} dt={m.group(2)} R={m.group(3)} paths={m.group(4)} tc={m.group(5)}" if m else n[:70]

for n, ins in funcs.items():
    if filt not in n:
        continue
    st = stats.get(n, {})
    print(f"{short(n)}: {st.get('regs', '?')} registers, spill stores/loads {st.get('spill', '?')} bytes, "
          f"static smem {st.get('smem', '?')} bytes")
    for a, op, args in ins:
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        if not m or int(m.group(1), 16) >= a:
            continue
        body = [o for x, o, _ in ins if int(m.group(1), 16) <= x <= a]
        c = collections.Counter(o.split(".")[0] for o in body)
        tc = c["HMMA"] + c["IMMA"]
        if tc < 8 or len(body) > 3000:  # not a tile loop, or an enclosing loop
            continue
        if c["ENDCOLLECTIVE"]:  # the compiler's copy for a diverged warp (BRA.DIV), not run normally
            continue
        top = ", ".join(f"{k} {v}" for k, v in c.most_common(int(os.environ.get("TOP", "8"))))
        print(f"  loop {m.group(1)}..{a:x}: {len(body)} instructions, {tc} HMMA/IMMA, "
              f"{c['LDL'] + c['STL']} LDL/STL, {c['STS']} STS, {c['LDSM']} LDSM; {top}")
EOF
