# Fourth device call (twenty-eighth session). Branch mma-tiles after call 3: MmaTokTiles at head_dim
# 128 only (the head_dim-64 instances are main's again), and the plan puts the InnerQ bodies first up
# to 32 per-token units per free block where the 4-row instance has the tiles (call 3, trace build:
# innerq2 at (64,32,8,8192) 206.3 -> 192.2 us). The GPU suite and memcheck on the policy and the
# tiles' tests, then main (90782db's kvq-bench as kvq-bench-base) against the branch, product builds.
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<main 90782db's kvq-bench> bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07i/call4/call4.sh
SUITE=1 FILTER='*MmaTokTiles*:*BodiesFirstPolicy*' \
  VARIANTS="kvq-bench-base;kvq-bench" \
  OUT=$OUT/a bash bench/device_ab.sh 2 kernels --presets innerq2,innerq,innerq_base,kivi2 \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 4,32,8,16384,128 --shape 1,9,3,8192,64 \
  --shape 1,32,32,32768,128 2>&1 | grep -v "^1,\|^16,\|^64,\|^4," | tail -12
