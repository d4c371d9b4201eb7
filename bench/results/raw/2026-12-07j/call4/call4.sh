# Fourth device call (twenty-ninth session): main after the kivi-lean merge (its kernels are
# SASS-identical to call 2's branch 0ccb904, whose GPU suite passed there), bounded to the
# session's remaining device time: the store's CUDA backend tests, the gRPC service's tests on the
# CUDA backend, the whole kvq-bench table and the PyTorch SDPA baseline against it.
# bundle: BUILD=build bash scripts/device_bundle.sh
# device tool, carry [".device"]: bash bench/results/raw/2026-12-07j/call4/call4.sh
(cd .device && xz -dc b.txz | tar xf -) || exit 1
mkdir -p $OUT/r  # every output straight under $OUT: a call cut short still returns what it wrote
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/r/gpu.txt
timeout 40 .device/run store_cuda_backend_test --gtest_brief=1 > $OUT/r/store_tests.txt 2>&1
echo "store rc=$?"; tail -2 $OUT/r/store_tests.txt
timeout 50 .device/run kvq_store_service_test --gtest_brief=1 --gtest_filter='*cuda*' > $OUT/r/service_tests.txt 2>&1
echo "service rc=$?"; tail -2 $OUT/r/service_tests.txt
timeout 120 .device/run kvq-bench kernels --json > $OUT/r/kvq.json 2> $OUT/r/kvq.err
echo "kvq-bench rc=$?"
PYTHONUNBUFFERED=1 timeout 80 python3 bench/kernels/sdpa_baseline.py --kvq $OUT/r/kvq.json > $OUT/r/sdpa.txt 2>&1
echo "sdpa rc=$?"
python3 bench/kernels/render.py $OUT/r/kvq.json | tail -40
tail -30 $OUT/r/sdpa.txt
