# First device call (2026-12-07, twenty-fifth session): branch ksym-fold (be78cb3, the IMMA body
# units' and one-row page units' instances with the presets' tensor modes built in) against main c39b39b (kvq-bench-base:
# also the first GPU run of main's merged build, the page units' two-stage plan rule): the GPU
# suite (whose page / ring depth tests check the plan rule), memcheck of the IMMA / page / ring
# tests, the store's and the service's CUDA tests, three alternating rounds at the InnerQ shapes.
# bundle: BUILD=build BASE_BIN=<kvq-bench of c39b39b> bash scripts/device_bundle.sh
# device tool, carry [".device"]:
SUITE=1 FILTER='*ImmaBody*:*Pages*:*RingDepths*:*DecodeStepsInSequence*' \
  VARIANTS="kvq-bench-base;kvq-bench" OUT=$OUT/a bash bench/device_ab.sh 3 kernels \
  --presets innerq,innerq2,innerq_base --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 \
  --shape 1,32,32,32768,128 --shape 16,32,32,4096,128 --shape 1,9,3,8192,64 2>&1 | tail -60
timeout 60 .device/run store_cuda_backend_test --gtest_brief=1 2>&1 | tail -2
timeout 60 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' 2>&1 | tail -2
