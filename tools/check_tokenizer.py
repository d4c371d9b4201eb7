#!/usr/bin/env python3
"""Checks the worker's tokenizer against Hugging Face `transformers` (which builds a `tokenizers`
byte-level BPE from the same GGUF file): identical ids on every text file given.

  python3 tools/check_tokenizer.py BUILD/tools/kvq-local MODEL.gguf FILE...
Needs: pip install transformers tokenizers gguf (torch not needed)."""
import os
import subprocess
import sys
import time

from transformers import AutoTokenizer


def main():
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    runner, model, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(model)), gguf_file=os.path.basename(model))
    failures = 0
    total = 0
    for path in files:
        text = open(path, encoding="utf-8").read()
        t0 = time.time()
        ref = tok(text, add_special_tokens=False)["input_ids"]
        t_ref = time.time() - t0
        out = subprocess.run([runner, "--model", model, "--tokenize", path], capture_output=True, text=True, check=True)
        ours = [int(x) for x in out.stdout.split()]
        total += len(ref)
        if ours == ref:
            print(f"{os.path.basename(path)}: {len(ref)} tokens, identical (transformers {t_ref:.2f} s; ours: {out.stderr.strip()})")
        else:
            failures += 1
            i = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            print(f"{os.path.basename(path)}: DIFFERENT at token {i}: ours {ours[max(0, i - 3):i + 5]} "
                  f"ref {ref[max(0, i - 3):i + 5]} (ours {len(ours)} tokens, ref {len(ref)})")
            print("   text there:", repr(tok.decode(ref[max(0, i - 3):i + 5])))
    # Special tokens and the chat template.
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there! 12345"}], tokenize=False, add_generation_prompt=True)
    ref = tok(chat, add_special_tokens=False)["input_ids"]
    open("/tmp/kvq_chat.txt", "w").write(chat)
    out = subprocess.run([runner, "--model", model, "--tokenize", "/tmp/kvq_chat.txt"], capture_output=True, text=True, check=True)
    ours = [int(x) for x in out.stdout.split()]
    print("chat template text:", "identical ids" if ours == ref else f"DIFFERENT ours {ours} ref {ref}")
    failures += ours != ref
    print(f"{'PASS' if failures == 0 else 'FAIL'}: {len(files)} files, {total} tokens")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
