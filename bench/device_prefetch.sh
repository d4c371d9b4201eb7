#!/usr/bin/env bash
# The per-token decode path's prefetch of each warp's next body tile (CudaStepRunner::set_prefetch,
# kvq-bench --prefetch) in one device call:
#   1. the GPU suite (with KernelsGpu.PrefetchModes), the store's CUDA backend tests, and
#      compute-sanitizer memcheck of PrefetchModes (skipped with SUITE=0);
#   2. kvq-bench kernels --json with each mode (MODES), alternating, ROUNDS times, on
#      the shapes whose body tiles take the per-token path (one query row per KV head: InnerQ always,
#      KIVI at (1,9,3,8192)); then KIVI with the tensor-core units off (--no-imma) at
#      (1,32,32,32768), with the same modes;
#   3. a summary: attention us per (shape, preset) and mode, from the JSON files.
# Outputs in $OUT: tests.txt, summary.txt, runs.tgz (r<round>_<mode>.json, kivi_<mode>.json and
# their stderr).
#
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_prefetch.sh
#   env: ROUNDS (2), SUITE (1), ITERS (30), MODES ("off l2bulk l1 l2"; "-late" variants too),
#        SHAPES ("B,Hq,Hkv,T,D ..."), PRESETS (innerq,kivi2,kivi4,innerq2)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_prefetch}
mkdir -p "$OUT"
(cd .device && xz -dc b.txz | tar xf -) || { echo "no bundle in .device (scripts/device_bundle.sh)"; exit 1; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SUITE:-1}" = 1 ]; then
  {
    timeout 240 .device/run kernels_gpu_test --gtest_brief=1 2>&1 | tail -4
    timeout 90 .device/run store_cuda_backend_test --gtest_brief=1 2>&1 | tail -3
    LD_LIBRARY_PATH=$PWD/.device/lib timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
      .device/bin/kernels_gpu_test --gtest_brief=1 --gtest_filter='*PrefetchModes*' 2>&1 | tail -3
  } | tee "$OUT/tests.txt"
  echo "[suite] at $(( $(date +%s) - t0 ))s"
fi
iters=${ITERS:-30}
modes=${MODES:-off l2bulk l1 l2}
shapes=(--shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 16,32,32,4096,128 --shape 1,9,3,8192,64)
[ -n "${SHAPES:-}" ] && { shapes=(); for sh in $SHAPES; do shapes+=(--shape "$sh"); done; }
for r in $(seq 1 "${ROUNDS:-2}"); do
  for m in $modes; do
    timeout 150 .device/run kvq-bench kernels --json --iters "$iters" --qa-steps 8 --presets "${PRESETS:-innerq,kivi2,kivi4,innerq2}" \
      "${shapes[@]}" --prefetch "$m" > "$OUT/r${r}_$m.json" 2> "$OUT/r${r}_$m.err"
    echo "[round $r $m] at $(( $(date +%s) - t0 ))s"
  done
done
for m in $modes; do
  timeout 100 .device/run kvq-bench kernels --json --iters "$iters" --qa-steps 8 --no-imma --presets kivi2,kivi4 \
    --shape 1,32,32,32768,128 --prefetch "$m" > "$OUT/kivi_$m.json" 2> "$OUT/kivi_$m.err"
done
echo "[kivi] at $(( $(date +%s) - t0 ))s"
python3 - "$OUT" > "$OUT/summary.txt" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(f)[:-5]
    try:
        d = json.load(open(f))
    except Exception as e:
        print(f"{name}: unreadable ({e})")
        continue
    for r in d["rows"]:
        k = (r["b"], r["hq"], r["hkv"], r["t"], r["d"], r["preset"])
        rows.setdefault(k, []).append((name, r["attn_us"], r.get("err", -1), r["kernel"]))
for k, v in rows.items():
    print("(%d,%d,%d,%d) D=%d %s" % k)
    for name, us, err, kern in v:
        print(f"  {name:<12} {us:8.2f} us  err {err:.1e}  {kern}")
EOF
cat "$OUT/summary.txt"
# one archive: a device call returns only a few files
(cd "$OUT" && tar czf runs.tgz ./*.json ./*.err && rm -f ./*.json ./*.err)
echo "[done] at $(( $(date +%s) - t0 ))s"
