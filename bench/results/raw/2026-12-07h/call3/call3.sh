# Third device call (2026-12-07, twenty-seventh session). Branch k-quads: the per-token loop's
# full-precision key rows read by lane quads from 4 rows up (KFullTileQuads: one load instruction
# covers 8 rows x 64 bytes instead of 32 rows x 16), because call 2's trace put ~19,500 of the
# around units' ~38,000 SM cycles per warp tile at (64,32,8,8192) in the key scores. The GPU suite
# and memcheck of the decode tests that run the 4- and 8-row instances; then main's kvq-bench
# (kvq-bench-base, 061eab6's kernels) against the branch's, two alternating rounds.
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<main's kvq-bench> bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07h/call3/call3.sh
SUITE=1 FILTER='*RowsPages*:*DecodeBatch/innerq2_fp16*:*DecodeCustomConfigs*' \
  VARIANTS="kvq-bench-base;kvq-bench" \
  OUT=$OUT/a bash bench/device_ab.sh 2 kernels --presets innerq2,innerq,innerq_base,kivi2 \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,9,3,8192,64 --shape 4,32,8,16384,128 2>&1 | grep -v "^1,\|^16,\|^64,\|^4," | tail -20
