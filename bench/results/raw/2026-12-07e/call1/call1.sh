# First device call (2026-12-07, twenty-fourth session): the lean round on main 08015f8 (1faae2e's
# kernels: the hybrid per-head instance, never run on a GPU as merged) with e6e1f4c's kvq-bench
# (the twenty-third session's call 7 build) as kvq-bench-base in the same run, then Nsight Compute's
# sections and stall samples on innerq's attention at (64,32,8,8192).
# bundle: BUILD=build BASE_BIN=<kvq-bench of e6e1f4c> bash scripts/device_bundle.sh
# device tool, carry [".device"]:
LEAN=1 BUDGET=575 NCU_STALLS="innerq_gqa64 64,32,8,8192,128 innerq" OUT=$OUT bash bench/device_round.sh 2>&1 | tail -80
