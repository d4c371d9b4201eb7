# Second device call (2026-12-07, twenty-second session): the final build's lean round (suite,
# store and service tests, the table against main 6278eb9's kvq-bench as base.json, SDPA, memcheck)
# with the quantize-append's largest carveout where the page units' bodies go first (the
# default now), then a chain dump at (16,32,32,4096) innerq with it on and off.
# bundle: BUILD=build BASE_BIN=<kvq-bench of 6278eb9 (twenty-first session's call 3)> bash scripts/device_bundle.sh
set -u
LEAN=1 BUDGET=220 OUT=$OUT bash bench/device_round.sh 2>&1 | tail -60
for w in auto; do
  timeout 30 .device/run kvq-bench kernels --presets innerq --shape 16,32,32,4096,128 --qa-steps 64 --chain-dump \
    --qa-wide $w > $OUT/chain_$w.txt 2>&1; echo "chain $w rc=$?"; grep -E 'step (1|2|31|32|33):|^16 ' $OUT/chain_$w.txt
done
xz -9 $OUT/chain_*.txt
