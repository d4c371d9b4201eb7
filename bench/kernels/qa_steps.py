#!/usr/bin/env python3
"""qa_step (what the quantize-append adds to a decode step) of several kvq-bench --json runs side by
side, per shape and preset, and as a share of the first run's attention time.

usage: python3 bench/kernels/qa_steps.py a.json b.json ...
"""
import json,sys
files=sys.argv[1:]
data={}
for f in files:
    d=json.load(open(f))
    for r in d['rows']:
        k=(r['b'],r['hq'],r['hkv'],r['t'],r['d'],r['preset'])
        data.setdefault(k,{})[f.split('/')[-1].replace('.json','')]=r
names=[f.split('/')[-1].replace('.json','') for f in files]
print('shape preset | attn(kvq) | qa_step: '+' '.join(f'{n:>9}' for n in names)+' | %: '+' '.join(f'{n:>8}' for n in names))
for k,v in data.items():
    a=v.get(names[0],{}).get('attn_us',0)
    qs=[v[n]['qa_step_us'] if n in v else float('nan') for n in names]
    pc=[100*q/a if a else float('nan') for q in qs]
    print(f"{k[0]},{k[1]},{k[2]},{k[3]},{k[4]} {k[5]:<12}| {a:8.2f} | "+' '.join(f'{q:9.2f}' for q in qs)+' | '+' '.join(f'{p:7.1f}%' for p in pc))
