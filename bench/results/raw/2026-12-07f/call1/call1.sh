# First device call (2026-12-07, twenty-fifth session), branch ksym-fold against main c39b39b
# (kvq-bench-base; also the first GPU run of main's merged build, the page units' two-stage plan
# rule): kvq-bench-modes = be78cb3 (the IMMA body units' and the one-row page units' instances
# with the presets' tensor modes built in), kvq-bench = 9ba7c44 (on top: the page rings' done count
# as one acq_rel atom without the two MEMBAR.SC.CTA). The GPU suite of 9ba7c44 + the test commit after it (its page / ring
# depth tests check the plan rule), memcheck of the IMMA / page / ring tests, alternating
# rounds at the InnerQ shapes (two: device time lost to failed machine starts). (The store's and service's tests: the bundle had no room.)
# bundle: NO_STORE_TESTS=1 BUILD=build BASE_BIN=<kvq-bench of c39b39b> \
#   EXTRA_BINS=<kvq-bench of be78cb3, named kvq-bench-modes> bash scripts/device_bundle.sh
# device tool, carry [".device"]:
SUITE=1 FILTER='*ImmaBody*:*Pages*' \
  VARIANTS="kvq-bench-base;kvq-bench-modes;kvq-bench" OUT=$OUT/a bash bench/device_ab.sh 2 kernels \
  --presets innerq,innerq2,innerq_base --shape 16,32,8,32768,128 --shape 64,32,8,8192,128 \
  --shape 1,32,32,32768,128 --shape 16,32,32,4096,128 --shape 1,9,3,8192,64 2>&1 | tail -60
