#!/usr/bin/env bash
# One device call: every step of kvq-bench's 128-step decode chain (--chain-dump) for innerq at
# (1,32,32,32768) and (1,32,32,16384), on the per-token path (--no-pages), the page units (two
# launches, PDL) and the fused step (--fused); prints per run the mean of step - attention and the
# steps where it exceeds 3 us. Raw outputs in $OUT.
# usage (device tool, carry [".device"]): OUT=$OUT bash bench/device_chain_dump.sh
set -uo pipefail
(cd .device && xz -dc b.txz | tar xf -) || exit 1
mkdir -p "$OUT"
for v in "--no-pages" "" "--fused"; do
  n=$(echo "x$v" | tr -d ' -')
  timeout 100 .device/run kvq-bench kernels --presets innerq --shape 1,32,32,32768,128 --shape 1,32,32,16384,128 --chain-dump --no-check $v > "$OUT/$n.txt" 2>&1
  echo "== $v"
  grep "^chain" "$OUT/$n.txt" | awk '{split($0,a," "); for(i=1;i<=NF;i++){if($i=="step" && $(i+1) ~ /^[0-9]+:$/) s=$(i+1); if($i=="qa") q=$(i+1); if($i=="step" && $(i+1) ~ /^[0-9.]+$/) st=$(i+1); if($i=="attn") at=$(i+1)}; d=st-at; key=$2; n[key]++; sum[key]+=d; if (d>3) {big[key]++; list[key]=list[key]" "s"("d")"} } END {for(k in n) printf "%s mean(step-attn)=%.2f steps>3us=%d:%s\n", k, sum[k]/n[k], big[k], substr(list[k],1,400)}'
done
