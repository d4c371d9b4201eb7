# One device call (2026-12-06, seventeenth session): the final build (MergeItemBlock but in the KIVI
# code units, bodies first beside KIVI code units up to 32 per free block) against main 0eff4e8
# (kvq-bench-base): the round (suite, store, service, the whole table against the base, SDPA,
# memcheck, read flush).
set -u
LEAN=1 FLUSH_READ=1 BUDGET=250 OUT=$OUT bash bench/device_round.sh 2>&1 | tail -45
