# First device call (2026-12-07, twenty-sixth session). Main e1bac06's kernels (SASS-identical to
# the twenty-fifth session's call-1 kernels, 9ba7c44): the whole GPU suite, memcheck of the IMMA /
# page tests, and, for the first time on these kernels, the store's CUDA backend tests and the
# service's CUDA tests. Then an A/B: kvq-bench = main e1bac06, kvq-bench-pp = branch pages-presets
# (c4ba8f7: the IMMA warp rings' units back on the run-time-mode instances, to take back the 3-5%
# lost at (1,9,3,8192); the page units keep the presets' instances). Two alternating rounds.
# bundle: BUILD=build EXTRA_BINS=<kvq-bench of c4ba8f7, named kvq-bench-pp> bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07g/call1/call1.sh
SUITE=1 FILTER='*ImmaBody*:*Pages*' \
  VARIANTS="kvq-bench;kvq-bench-pp" OUT=$OUT/a bash bench/device_ab.sh 2 kernels \
  --presets innerq,innerq2,innerq_base --shape 1,9,3,8192,64 --shape 16,32,32,4096,128 \
  --shape 64,32,8,8192,128 --shape 16,32,8,32768,128 --shape 1,32,32,32768,128 2>&1 | tail -70
timeout 90 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/a/store_tests.txt 2>&1
echo "store rc=$?"; tail -3 $OUT/a/store_tests.txt
timeout 90 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/a/service_tests.txt 2>&1
echo "service rc=$?"; tail -3 $OUT/a/service_tests.txt
