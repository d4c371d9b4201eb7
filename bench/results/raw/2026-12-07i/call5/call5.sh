# Fifth device call (twenty-eighth session). Branch mma-tiles after call 4: the launch asks for the
# mma tiles only where the bodies go first (call 4: (4,32,8,16384), around units split and run first,
# innerq2 0.958x with them). Kernels as in call 4 (host plan and tests changed). The GPU suite and
# memcheck on the tiles' test, then main (90782db's kvq-bench) against the branch.
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<main 90782db's kvq-bench> bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07i/call5/call5.sh
SUITE=1 FILTER='*MmaTokTiles*' \
  VARIANTS="kvq-bench-base;kvq-bench" \
  OUT=$OUT/a bash bench/device_ab.sh 2 kernels --presets innerq2,innerq,innerq_base,kivi2 \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 4,32,8,16384,128 \
  2>&1 | grep -v "^1,\|^16,\|^64,\|^4," | tail -12
