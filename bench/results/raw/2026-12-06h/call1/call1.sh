# One device call (2026-12-06, eighteenth session): branch kivi-pool2 (pools of tiles for the KIVI
# code units, kivi-pool rebased onto main 6d49fbb) against main 6d49fbb (kvq-bench-base): the GPU
# suite, memcheck on the pool and many-units tests, then a two-round A/B of main, the branch with
# pools off (its default), and --tile-pool 0.5 / 0.75; then a quantize-append trace.
# bundle: BUILD=build BASE_BIN=<kvq-bench of 6d49fbb> NO_STORE_TESTS=1 bash scripts/device_bundle.sh
set -u
S3="--shape 1,32,32,32768,128 --shape 16,32,8,32768,128 --shape 64,32,8,8192,128"
FILTER='*KiviTilePools*:*ManyUnits*' VARIANTS="kvq-bench-base;kvq-bench;kvq-bench:--tile-pool 0.5;kvq-bench:--tile-pool 0.75" \
  OUT=$OUT/a timeout 470 bash bench/device_ab.sh 2 kernels --presets kivi2,kivi4 $S3 2>&1 | tail -80
# the quantize-append at (16,32,32,4096) innerq (qa_step 9.5% of the attention): each chain step
# and its phase trace, main's kernels
timeout 90 .device/run kvq-bench-base kernels --presets innerq --shape 16,32,32,4096,128 --qa-steps 32 \
  --chain-dump --qa-trace > $OUT/qa16.txt 2>&1; echo "qa16 rc=$?"; grep -E "mean over|qa_step" $OUT/qa16.txt | head; tail -4 $OUT/qa16.txt
