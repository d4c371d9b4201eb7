# Second device call (2026-12-07, twenty-fourth session; after failed machine starts, one call for
# the A/B and the checks): branch slim-micro against main 08015f8 in the same call:
#  - slim-tok: the InnerQ instances keep the per-token path's tile state in the warp's union (4-row
#    static shared memory 19,456 -> 15,360 bytes, so the plan's third page-ring stage fits four
#    blocks per SM);
#  - slim-micro on top: the IMMA tile's 2-bit code words as one 8-byte read and the value
#    accumulation as two FMAs (16 fewer instructions per tile at 3/2 bits, 32 at 2/2).
# Variants: main, slim-micro (its plan: three stages at 4 rows), slim-micro held to two stages
# (--stages 2: the instruction changes alone, against main). The GPU suite, memcheck of the page /
# IMMA / ring tests, the store's and the service's CUDA tests; three alternating rounds
# (the Nsight Compute step was dropped: device time spent on failed machine starts).
# bundle: BUILD=build BASE_BIN=<kvq-bench of 08015f8> bash scripts/device_bundle.sh
# device tool, carry [".device"]:
SUITE=1 FILTER='*Pages*:*ImmaBody*:*RingDepths*:*DecodeStepsInSequence*' \
  VARIANTS="kvq-bench-base;kvq-bench;kvq-bench:--stages 2" OUT=$OUT/a bash bench/device_ab.sh 3 kernels \
  --presets innerq,innerq2,innerq_base --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 \
  --shape 1,32,32,32768,128 --shape 16,32,32,4096,128 --shape 1,9,3,8192,64 2>&1 | tail -70
timeout 60 .device/run store_cuda_backend_test --gtest_brief=1 2>&1 | tail -2
timeout 60 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' 2>&1 | tail -2
