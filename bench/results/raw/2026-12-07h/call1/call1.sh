# Run as the twenty-seventh session's first device call (2026-12-07, H200: the machine that came),
# unchanged from branch prefetch-around's bench/results/raw/2026-12-07g/call3/call3.sh (b9370e3,
# 040219b), the bundle built on that branch (040219b) with main's kvq-bench (061eab6's kernels)
# as kvq-bench-base. Output: ab.tgz (r/gpu_tests.txt, memcheck.txt, v*.txt rounds).
# Third device call (2026-12-07, twenty-sixth session). Branch prefetch-around: the per-token units
# around a body (sink and fp16 window) ask for all their K and V rows into L2 (one
# cp.async.bulk.prefetch.L2 per row) before their first tile (call 2's trace: at (64,32,8,8192) the
# 512 such units ran ~45 us, ~22 us per tile, before any body started). The GPU suite (with the
# new AroundPrefetch test) and memcheck; then kvq-bench-base = main's kvq-bench (061eab6's kernels; the call-2
# bundle's kvq-bench has them too), and the branch's binary
# with the prefetch off and on (--no-prefetch-around / --prefetch-around). Two alternating rounds.
# (Not run in the twenty-sixth session: its device time went to failed machine starts.)
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<main's kvq-bench> bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07g/call3/call3.sh
SUITE=1 FILTER='*AroundPrefetch*:*Pages*' \
  VARIANTS="kvq-bench-base;kvq-bench:--no-prefetch-around;kvq-bench:--prefetch-around" \
  OUT=$OUT/a bash bench/device_ab.sh 2 kernels --presets innerq2,innerq,innerq_base,kivi2 \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 16,32,32,4096,128 \
  --shape 1,32,32,32768,128 --shape 1,9,3,8192,64 2>&1 | grep -v "^1,\|^16,\|^64," | tail -20
