# Fourth device call (twenty-ninth session): main after the kivi-lean merge (32d0113; its kernels
# are SASS-identical to call 2's branch 0ccb904): the lean round, everything bounded to fit the
# session's remaining device time: the GPU suite, the store's CUDA backend tests and the gRPC
# service's tests on the CUDA backend, the whole kvq-bench table and the PyTorch SDPA baseline.
# bundle: BUILD=build bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07j/call4/call4.sh
LEAN=1 BUDGET=400 bash bench/device_round.sh
