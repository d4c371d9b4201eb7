# First device call of branch mma-tiles (written in the twenty-eighth session, 2026-12-07, which
# had no device: new loans were paused). The per-token units' full-precision tiles (sink and
# windows around the bodies) on the fp16 / bf16 tensor cores (MmaTokTiles) in the 4-row InnerQ and
# KIVI code units' tensor-core instances. The GPU suite and memcheck on the new test, then main
# (90782db's kvq-bench as kvq-bench-base) against the branch with the tiles off (--no-mma-tiles: the
# same binary's per-token path, so the code change alone) and on (its default). Two alternating rounds.
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<main 90782db's kvq-bench> bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07i/call1/call1.sh
SUITE=1 FILTER='*MmaTokTiles*' \
  VARIANTS="kvq-bench-base;kvq-bench:--no-mma-tiles;kvq-bench" \
  OUT=$OUT/a bash bench/device_ab.sh 2 kernels --presets innerq2,innerq,kivi2 \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,9,3,8192,64 2>&1 | grep -v "^1,\|^16,\|^64," | tail -20
