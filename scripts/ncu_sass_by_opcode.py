#!/usr/bin/env python3
"""Warp-stall samples of an Nsight Compute source page (bench/ncu_stalls.sh's NAME_sass.csv) summed
by SASS opcode, with each opcode's top stall reasons.

usage: scripts/ncu_sass_by_opcode.py NAME_sass.csv
"""
import csv,sys,collections
f=sys.argv[1]; top=int(sys.argv[2]) if len(sys.argv)>2 else 40
rows=list(csv.reader(open(f)))
h=rows[1]; data=rows[2:]
ix={k:i for i,k in enumerate(h)}
tot=sum(int(r[ix["Warp Stall Sampling (All Samples)"]] or 0) for r in data)
print("total samples",tot, "instructions", len(data))
# opcode aggregate
agg=collections.Counter(); stallagg=collections.defaultdict(collections.Counter)
reasons=[k for k in h if k.startswith('stall_') and 'Not Issued' not in k]
for r in data:
    op=r[ix["Source"]].strip().split()[0] if r[ix["Source"]].strip() else '?'
    if op.startswith('@'): op=r[ix["Source"]].strip().split()[1]
    op=op.split('.')[0]
    s=int(r[ix["Warp Stall Sampling (All Samples)"]] or 0)
    agg[op]+=s
    for k in reasons: stallagg[op][k]+=int(r[ix[k]] or 0)
print("by opcode:")
for op,s in agg.most_common(top):
    rs=', '.join(f"{k[6:]}={v}" for k,v in stallagg[op].most_common(4))
    print(f"  {op:10s} {s:7d} {100*s/tot:5.1f}%  {rs}")
