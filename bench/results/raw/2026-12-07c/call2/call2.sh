# Second device call (2026-12-07, twenty-second session), cut to what the session's device time
# left: the final build's GPU suite on the quantize-append and decode-step tests (variant 2 of
# DecodeStepsInSequence runs the wide instances), then one round of main 6278eb9's kvq-bench
# (kvq-bench-base) against the final build (the largest carveout where the page units' bodies go
# first, now the default) at the shapes where the rule applies and one where it does not.
# bundle: BUILD=build BASE_BIN=<kvq-bench of 6278eb9 (twenty-first session's call 3)> bash scripts/device_bundle.sh
set -u
(cd .device && xz -dc b.txz | tar xf -)
timeout 60 .device/run kernels_gpu_test --gtest_brief=1 --gtest_filter='*Quantize*:*DecodeSteps*' > $OUT/gpu_tests.txt 2>&1
echo "suite rc=$?"; tail -3 $OUT/gpu_tests.txt
SUITE=0 VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a timeout 200 \
  bash bench/device_ab.sh 1 kernels --presets innerq,innerq2,innerq_base \
  --shape 16,32,32,4096,128 --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 2>&1 | tail -30
# Not run: the session's device time ran out (failed machine starts) before this call could start;
# the twenty-third session ran the same build in raw/2026-12-07d/call1 (a lean round) instead.
