# First device call (2026-12-07, twenty-second session): does the one-token quantize-append cost the
# attention resident places? Main's block per (sequence, KV head) has 48 registers and 5 KB of
# shared memory (4 KB of it unused); a full wave of the one-row InnerQ page units (5 x 96 registers
# x 128 threads) leaves 4,096 registers on an SM, so none fits beside it. Branch qa-lean: 32
# registers and 1 KB (__launch_bounds__ min 16 blocks), optionally fewer blocks that walk the heads
# (--qa-head-blocks N), and the quantize-append's shared-memory carveout at its largest
# (--qa-carveout 100, so that an SM it lands on keeps room for the attention's rings).
# A/B, two rounds: main (kvq-bench-base) with and without the carveout; the branch one block per
# head with and without it; the branch with 132 and 264 blocks (H100: 1 and 2 per SM) and the
# carveout. Then call 4 of the twenty-first session (chain dump at the 512-head shapes).
# bundle: BUILD=build BASE_BIN=<kvq-bench of 6278eb9 (call 3's)> bash scripts/device_bundle.sh
set -u
S6="--shape 16,32,32,4096,128 --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128 --shape 1,32,32,4096,128 --shape 1,9,3,8192,64"
FILTER='*Quantize*:*Flush*:*DecodeSteps*' SUITE=1 \
  VARIANTS="kvq-bench-base;kvq-bench-base:--qa-carveout 100;kvq-bench;kvq-bench:--qa-carveout 100;kvq-bench:--qa-head-blocks 132 --qa-carveout 100;kvq-bench:--qa-head-blocks 264 --qa-carveout 100" \
  OUT=$OUT/a timeout 400 bash bench/device_ab.sh 2 kernels --presets innerq,kivi2,innerq2 $S6 2>&1 | tail -140
timeout 60 .device/run kvq-bench kernels --presets innerq,kivi2 --shape 16,32,32,4096,128 --shape 64,32,8,8192,128 \
  --qa-steps 64 --chain-dump > $OUT/chain.txt 2>&1; echo "chain rc=$?"
grep -E 'step (0|1|2|31|32|33):' $OUT/chain.txt
xz -9 $OUT/chain.txt
timeout 50 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/store.txt 2>&1; echo "store rc=$?"; tail -2 $OUT/store.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/service.txt 2>&1; echo "service rc=$?"; tail -2 $OUT/service.txt
