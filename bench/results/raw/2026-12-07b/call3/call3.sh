# Third device call (2026-12-07, twenty-first session): the final build (main with the quantize-append
# of one-token steps as one block of four warps per (sequence, KV head), 6278eb9) in a lean round:
# the GPU suite, the store's CUDA backend and service tests (now on the new default), the whole
# kvq-bench table against a1ffac8's (kvq-bench-base), PyTorch SDPA, memcheck as time allows.
# bundle: BUILD=build BASE_BIN=<kvq-bench of a1ffac8> bash scripts/device_bundle.sh
LEAN=1 BUDGET=360 OUT=$OUT bash bench/device_round.sh 2>&1 | tail -120
# (1,9,3,8192): why innerq's qa_step (~3.7 us) is twice kivi2's (~1.6): each chain step's times
(cd .device && [ -x bin/kvq-bench ] || { xz -dc b.txz | tar xf -; })
for p in innerq kivi2; do
  timeout 40 .device/run kvq-bench kernels --presets $p --shape 1,9,3,8192,64 --qa-steps 64 --chain-dump \
    > $OUT/chain_$p.txt 2>&1; echo "chain $p rc=$?"; grep -E '^1 ' $OUT/chain_$p.txt | head -2
done
xz -9 $OUT/chain_*.txt
