#!/usr/bin/env python3
"""Renders `kvq-bench kernels --json` output as the table kvq-bench prints, and with --base FILE
(another kvq-bench JSON of the same shapes, e.g. an older revision in the same device run) a
side-by-side of attention, quantize-append and whole-step times.

usage: python3 bench/kernels/render.py kvq.json [--base base.json]
"""
import argparse
import json


def key(r):
    return (r["b"], r["hq"], r["hkv"], r["t"], r["d"], r["preset"])


ERR_BOUND = 2e-3  # the GPU suite's bound for fp16 activations


def err_text(r):
    """Normalized error of sequence 0 against the CPU reference (runs since 2026-12-04), * above the bound."""
    e = r.get("err", -1)
    if e is None or e < 0:
        return f"{'-':>8}"
    return f"{e:>7.1e}{'*' if e > ERR_BOUND else ' '}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kvq")
    ap.add_argument("--base")
    args = ap.parse_args()
    with open(args.kvq) as f:
        d = json.load(f)
    print(f"device: {d['device']}, device-to-device copy bandwidth: {d['copy_gbps']:.1f} GB/s (read + write), "
          f"timing {d.get('timing', 'idle')}")
    print("qapp_us: quantize-append of the timed step (the first decode step after the initial flush, whose window "
          "starts at its keep size: it appends and flushes nothing; step_us likewise); qa_avg_us: its mean over "
          "consecutive decode steps (every flush phase); qa/attn = qa_avg_us / attn_us (qapp_us where no mean was taken)")
    print("qa_step: what the quantize-append adds to a step, the mean step minus the mean attention over the same "
          "steps (runs since 2026-12-05f; with PDL the units reading nothing it writes run beside it); "
          "in_step = qa_step / attn_us; empty: the same with an empty grid in its place (a launch's own cost)")
    print(f"err: sequence 0 against the CPU reference, * above {ERR_BOUND:.0e} (- not checked)")
    print(f"{'B':<4} {'Hq':<4} {'Hkv':<4} {'T':<6} {'D':<4} {'preset':<12} {'attn_us':>9} {'bytes_read':>12} "
          f"{'GB/s':>8} {'%copy':>6} {'qapp_us':>8} {'qa_avg_us':>9} {'qa/attn':>7} {'step_us':>8} {'qa_step':>8} "
          f"{'in_step':>7} {'empty':>6} {'err':>8}  kernel")
    for r in d["rows"]:
        qa = r.get("qa_avg_us", r["qa_us"])
        qs = r.get("qa_step_us")
        qs_text = f"{qs:>8.2f} {100 * qs / r['attn_us']:>6.1f}%" if qs is not None else f"{'-':>8} {'-':>7}"
        es = r.get("empty_step_us")
        qs_text += f" {es:>6.2f}" if es is not None else f" {'-':>6}"
        print(f"{r['b']:<4} {r['hq']:<4} {r['hkv']:<4} {r['t']:<6} {r['d']:<4} {r['preset']:<12} {r['attn_us']:>9.2f} "
              f"{r['bytes']:>12.0f} {r['gbps']:>8.1f} {100 * r['copy_frac']:>5.1f}% {r['qa_us']:>8.2f} "
              f"{r.get('qa_avg_us', float('nan')):>9.2f} {100 * qa / r['attn_us']:>6.1f}% {r.get('step_us', 0.0):>8.2f}"
              f" {qs_text} {err_text(r)}  {r['kernel']}")
    if not args.base:
        return
    with open(args.base) as f:
        b = json.load(f)
    if b.get("timing", "idle") != d.get("timing", "idle"):
        print(f"warning: base timed '{b.get('timing', 'idle')}', this run '{d.get('timing', 'idle')}': not comparable")
    base = {key(r): r for r in b["rows"]}
    both_avg = all("qa_avg_us" in r for r in d["rows"] + b["rows"])
    qa_key = "qa_avg_us" if both_avg else "qa_us"
    print(f"\nagainst the base (same run): times in us, speedup = base / this; quantize-append: {qa_key}")
    print(f"{'B':<4} {'Hq':<4} {'Hkv':<4} {'T':<6} {'D':<4} {'preset':<12} {'attn':>8} {'base':>8} {'speedup':>8} "
          f"{'qapp':>7} {'base':>7} {'step':>8} {'base':>8} {'speedup':>8} {'qa_step':>8} {'base':>8}  kernel")
    for r in d["rows"]:
        o = base.get(key(r))
        if o is None:
            continue
        sb, sr = o.get("step_us", 0.0), r.get("step_us", 0.0)
        qs = [f"{x['qa_step_us']:>8.2f}" if "qa_step_us" in x else f"{'-':>8}" for x in (r, o)]
        print(f"{r['b']:<4} {r['hq']:<4} {r['hkv']:<4} {r['t']:<6} {r['d']:<4} {r['preset']:<12} {r['attn_us']:>8.2f} "
              f"{o['attn_us']:>8.2f} {o['attn_us'] / r['attn_us']:>7.2f}x {r[qa_key]:>7.2f} {o[qa_key]:>7.2f} "
              f"{sr:>8.2f} {sb:>8.2f} {(sb / sr if sr else 0):>7.2f}x {qs[0]} {qs[1]}  {r['kernel']}")


if __name__ == "__main__":
    main()
