#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries here (Release, sm_90) and packs them, with the shared
# libraries a GPU machine lacks, into .device/ for one device call (bench/device_round.sh runs
# them there). With BASE=<git rev>, that revision's kvq-bench is built too and bundled as
# kvq-bench-base, for an A/B in the same run; pick a revision whose kvq-bench times the same way
# (busy timing: 9d2e0ab or later).
#
# usage: scripts/device_bundle.sh            # BUILD=build by default
#        BASE=9d2e0ab scripts/device_bundle.sh
#        STORE_BENCH=1 scripts/device_bundle.sh   # with kvq-bench-store (the bundle must stay
#                                                 # under the 64 MiB a device call carries)
#        BASE_BIN=F BASE_STORE_BIN=G ...          # prebuilt kvq-bench / kvq-bench-store bundled as
#                                                 # kvq-bench-base / kvq-bench-store-base
#        EXTRA_BINS="F G" ...                     # more prebuilt binaries (variants for an A/B),
#                                                 # bundled under their file names
#        NO_STORE_TESTS=1 ...                     # without the store's two test binaries (room
#                                                 # for more kvq-bench variants)
#        BENCH_ONLY=1 ...                         # kvq-bench alone, no test binary
# then:  device tool, carry [".device"], command "bash bench/device_round.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
JOBS=${JOBS:-2}
targets=(kvq-bench)
[ -z "${BENCH_ONLY:-}" ] && targets+=(kernels_gpu_test)
[ -z "${NO_STORE_TESTS:-}${BENCH_ONLY:-}" ] && targets+=(store_cuda_backend_test kvq_store_service_test)
[ -n "${STORE_BENCH:-}" ] && targets+=(kvq-bench-store)  # the store lanes benchmark, when wanted
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j"$JOBS" --target "${targets[@]}"
bins=("$BUILD/bench/kernels/kvq-bench")
[ -z "${BENCH_ONLY:-}" ] && bins+=("$BUILD/tests/kernels_gpu/kernels_gpu_test")
[ -z "${NO_STORE_TESTS:-}${BENCH_ONLY:-}" ] && bins+=("$BUILD/tests/kernels_gpu/store_cuda_backend_test" "$BUILD/tests/kvstore/kvq_store_service_test")
[ -n "${STORE_BENCH:-}" ] && bins+=("$BUILD/bench/store/kvq-bench-store")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "${BASE_BIN:-}" ]; then  # a kvq-bench built before (e.g. taken from an earlier bundle)
  mkdir -p "$tmp/basebin"
  cp "$BASE_BIN" "$tmp/basebin/kvq-bench-base"
  bins+=("$tmp/basebin/kvq-bench-base")
elif [ -n "${BASE:-}" ]; then
  git worktree add -f "$tmp/base" "$BASE" >/dev/null
  cmake -S "$tmp/base" -B "$tmp/base/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$tmp/base/build" -j"$JOBS" --target kvq-bench
  mkdir -p "$tmp/basebin"
  cp "$tmp/base/build/bench/kernels/kvq-bench" "$tmp/basebin/kvq-bench-base"
  bins+=("$tmp/basebin/kvq-bench-base")
  git worktree remove --force "$tmp/base"
fi
if [ -n "${BASE_STORE_BIN:-}" ]; then  # a kvq-bench-store built before, for a store A/B
  mkdir -p "$tmp/basebin"
  cp "$BASE_STORE_BIN" "$tmp/basebin/kvq-bench-store-base"
  bins+=("$tmp/basebin/kvq-bench-store-base")
fi
# shellcheck disable=SC2206
[ -n "${EXTRA_BINS:-}" ] && bins+=(${EXTRA_BINS})
../shared/tools/device-bundle.sh "$tmp/bundle" "${bins[@]}"
strip "$tmp/bundle/bin/"*
rm -rf .device
mkdir -p .device
cp "$tmp/bundle/run" .device/
# binaries of ~22 MB each, mostly the same kernels: xz -9e in one stream with a dictionary that
# spans the whole tar finds them again in each binary (six binaries and the libraries: 57 MB with
# 256 MiB, 66 MiB with -9e's own 64 MiB; -6 over two threads came to 63 MiB for four)
(cd "$tmp/bundle" && tar cf - bin lib | xz -T1 --lzma2=preset=9e,dict=256MiB > "$OLDPWD/.device/b.txz")
ls -la .device
size=$(stat -c %s .device/b.txz)
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
  echo "device_bundle: .device/b.txz is $((size >> 20)) MiB: too close to the 64 MiB a device call carries" >&2
  exit 1
fi
