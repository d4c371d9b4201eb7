# Seventh device call (2026-12-07, twenty-third session): the lean round on main's final build
# (e6e1f4c: the lane quantizer of ff8413a) with main e07e580's kvq-bench (the session's start) as
# kvq-bench-base in the same run.
# bundle: BUILD=build BASE_BIN=<kvq-bench of e07e580> bash scripts/device_bundle.sh
# device tool, carry [".device"]:
LEAN=1 BUDGET=575 OUT=$OUT bash bench/device_round.sh 2>&1 | tail -80
