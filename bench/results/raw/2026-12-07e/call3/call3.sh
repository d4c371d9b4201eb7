# Third device call (2026-12-07, twenty-fourth session; did not run: no device time left): the merged
# build (slim-micro's kernels, the page units' two-stage rule)
# with main 08015f8's kvq-bench as kvq-bench-base: the page /
# ring / bodies-first GPU tests (the new ring-depth check), the whole table against the base, and
# SDPA. The full GPU suite, memcheck and the store's and service's tests ran on these kernels in
# call 2 (the plan change is host code).
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<kvq-bench of 08015f8> bash scripts/device_bundle.sh
# device tool, carry [".device"]:
(cd .device && xz -dc b.txz | tar xf -)
timeout 60 .device/run kernels_gpu_test --gtest_brief=1 --gtest_filter='*RowsPages*:*OneRowPages*:*RingDepths*:*BodiesFirst*' 2>&1 | tail -3
timeout 60 .device/run kvq-bench kernels --json > $OUT/kvq.json 2> $OUT/kvq.err; echo "kvq rc=$?"
timeout 60 .device/run kvq-bench-base kernels --json > $OUT/base.json 2> $OUT/base.err; echo "base rc=$?"
timeout 60 python3 bench/kernels/sdpa_baseline.py --kvq $OUT/kvq.json > $OUT/sdpa.txt 2>&1; echo "sdpa rc=$?"
python3 bench/kernels/render.py $OUT/kvq.json --base $OUT/base.json 2>&1 | tail -40
tail -12 $OUT/sdpa.txt
