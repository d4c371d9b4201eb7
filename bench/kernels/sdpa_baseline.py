#!/usr/bin/env python3
"""External baseline for `kvq-bench kernels`: PyTorch scaled_dot_product_attention, fp16, one
query token per sequence over a T-token KV cache, on the same shapes, each backend tried and the
fastest kept. Times with CUDA events after a warm-up, medians, rotating over several independent
caches so that L2 does not serve repeats. With --kvq FILE (the output of `kvq-bench kernels
--json`) it prints our speedup per preset against the fastest SDPA backend.
Timing as in kvq-bench (--timing busy, the default): each timed call is preceded by zeroing a
buffer of 4x L2, so L2 is cold and the events bracket the GPU time alone, not PyTorch's dispatch
and launch latency; --timing busy-read reads that buffer instead (kvq-bench --flush read: L2 cold
but clean, so the first misses do not write back a full L2 of dirty lines); --timing idle times
single calls on an idle stream (the earlier method).

usage: python3 bench/kernels/sdpa_baseline.py [--kvq kvq.json] [--json out.json] [--iters N]
                                              [--timing busy|busy-read|idle]
"""
import argparse
import json
import math
import statistics
import warnings

import torch
import torch.nn.functional as F

SHAPES = [(1, 32, 32, 4096, 128), (1, 32, 32, 32768, 128), (16, 32, 32, 4096, 128),
          (16, 32, 8, 32768, 128), (64, 32, 8, 8192, 128), (1, 9, 3, 8192, 64)]


def backends():
    from torch.nn.attention import SDPBackend
    out = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out.append(("cudnn", SDPBackend.CUDNN_ATTENTION))
    out.append(("math", SDPBackend.MATH))
    return out


def time_one(b, hq, hkv, t, d, iters, backend, flush, read_flush):
    from torch.nn.attention import sdpa_kernel
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    set_bytes = 2 * b * hkv * t * d * 2
    sets = max(1, min(8, math.ceil(4 * l2 / set_bytes)))
    gen = torch.Generator(device="cuda").manual_seed(1)
    qs = [torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(sets)]
    ks = [torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(sets)]
    vs = [torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(sets)]
    gqa = hq != hkv

    def call(i):
        return F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=gqa)

    with sdpa_kernel(backend):
        call(0)  # raises when the backend does not support this case
        torch.cuda.synchronize()
        times = []
        for i in range(iters + 3 * sets):
            if flush is not None and read_flush:
                flush.max()  # reads the buffer; the result stays on the device
            elif flush is not None:
                flush.zero_()
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            call(i % sets)
            e1.record()
            e1.synchronize()
            if i >= 3 * sets:
                times.append(e0.elapsed_time(e1) * 1000.0)
    del qs, ks, vs
    torch.cuda.empty_cache()
    return statistics.median(times)


def main():
    warnings.filterwarnings("ignore")  # PyTorch explains every backend it skips
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvq", help="kvq-bench kernels --json output")
    ap.add_argument("--json", help="write the SDPA results here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--timing", choices=["busy", "busy-read", "idle"], default="busy")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, timing {args.timing}")
    flush = None
    if args.timing != "idle":
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        flush = torch.full((max(4 * l2, 256 << 20) // 4,), 0x5A5A5A5A, dtype=torch.int32, device="cuda")
    results = []
    for (b, hq, hkv, t, d) in SHAPES:
        best = None
        per = {}
        for name, be in backends():
            try:
                us = time_one(b, hq, hkv, t, d, args.iters, be, flush, args.timing == "busy-read")
            except Exception as e:  # backend unsupported for this shape
                per[name] = None
                continue
            per[name] = us
            if best is None or us < best[1]:
                best = (name, us)
        bytes_read = 2 * b * hkv * t * d * 2 + 2 * b * hq * d * 2
        results.append({"b": b, "hq": hq, "hkv": hkv, "t": t, "d": d, "backend": best[0], "us": best[1],
                        "gbps": bytes_read / (best[1] * 1e-6) / 1e9, "all": per})
    print(f"{'B':<4} {'Hq':<4} {'Hkv':<4} {'T':<6} {'D':<4} {'best':<10} {'sdpa_us':>9} {'GB/s':>8}  all backends (us)")
    for r in results:
        alls = ", ".join(f"{k}={v:.1f}" if v is not None else f"{k}=n/a" for k, v in r["all"].items())
        print(f"{r['b']:<4} {r['hq']:<4} {r['hkv']:<4} {r['t']:<6} {r['d']:<4} {r['backend']:<10} {r['us']:>9.2f} {r['gbps']:>8.1f}  {alls}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.kvq:
        with open(args.kvq) as f:
            kvq = json.load(f)
        if kvq.get("timing", "idle") != args.timing:
            print(f"warning: kvq-bench timed '{kvq.get('timing', 'idle')}', this run '{args.timing}': not comparable")
        print(f"\nour decode attention vs PyTorch SDPA fp16 (fastest backend); copy bandwidth {kvq['copy_gbps']:.0f} GB/s")
        print(f"{'B':<4} {'Hq':<4} {'Hkv':<4} {'T':<6} {'D':<4} {'preset':<12} {'kvq_us':>9} {'sdpa_us':>9} {'speedup':>8} {'%copy':>7}")
        for row in kvq["rows"]:
            key = (row["b"], row["hq"], row["hkv"], row["t"], row["d"])
            ref = next((r for r in results if (r["b"], r["hq"], r["hkv"], r["t"], r["d"]) == key), None)
            if ref is None:
                continue
            print(f"{row['b']:<4} {row['hq']:<4} {row['hkv']:<4} {row['t']:<6} {row['d']:<4} {row['preset']:<12} "
                  f"{row['attn_us']:>9.2f} {ref['us']:>9.2f} {ref['us'] / row['attn_us']:>7.2f}x {100 * row['copy_frac']:>6.1f}%")


if __name__ == "__main__":
    main()
