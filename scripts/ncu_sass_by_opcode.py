#!/usr/bin/env python3
"""Warp-stall samples of an Nsight Compute source page (bench/ncu_stalls.sh's NAME_sass.csv) summed
by SASS opcode, with each opcode's four most frequent stall reasons.

usage: scripts/ncu_sass_by_opcode.py NAME_sass.csv [TOP]   (TOP opcodes, default 40)
"""
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def opcode(source):
    """The opcode of a SASS line without its predicate and modifiers: '@P0 LDG.E.64 ...' -> 'LDG'."""
    words = source.split()
    if not words:
        return "?"
    if words[0].startswith("@") and len(words) > 1:
        words = words[1:]
    return words[0].split(".")[0]


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    rows = list(csv.reader(open(path)))
    header, data = rows[1], rows[2:]  # row 0 names the kernel
    col = {name: i for i, name in enumerate(header)}
    reasons = [k for k in header if k.startswith("stall_") and "Not Issued" not in k]

    def count(row, name):
        return int(row[col[name]] or 0)

    samples = collections.Counter()
    by_reason = collections.defaultdict(collections.Counter)
    for row in data:
        op = opcode(row[col["Source"]])
        samples[op] += count(row, SAMPLES)
        for k in reasons:
            by_reason[op][k] += count(row, k)
    total = sum(samples.values())
    print("total samples", total, "instructions", len(data))
    print("by opcode:")
    for op, n in samples.most_common(top):
        why = ", ".join(f"{k[len('stall_'):]}={v}" for k, v in by_reason[op].most_common(4))
        print(f"  {op:10s} {n:7d} {100 * n / max(total, 1):5.1f}%  {why}")


if __name__ == "__main__":
    main()
