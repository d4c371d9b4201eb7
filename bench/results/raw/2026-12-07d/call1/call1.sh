# First device call of the twenty-third session (2026-12-07): the lean round on main e07e580's
# build (the quantize-append's wide instances the default where the InnerQ page units' bodies go
# first), with main 6278eb9's kvq-bench (the twenty-first session's final build, before the
# carveout rule) as kvq-bench-base in the same run.
# bundle: BUILD=build BASE_BIN=<kvq-bench of 6278eb9> bash scripts/device_bundle.sh
# device tool, carry [".device"]:
LEAN=1 BUDGET=575 OUT=$OUT bash bench/device_round.sh 2>&1 | tail -80
