#!/usr/bin/env python3
"""Checks the worker's transformer against Hugging Face `transformers` loading the same GGUF file
(dequantized to float32): logits of every generation step and greedy tokens.

  python3 tools/check_logits.py BUILD/tools/kvq-local MODEL.gguf [--attention exact|fp16|kivi2|...] [--tokens 40]
Needs: pip install torch transformers gguf."""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "The capital of France is",
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runner")
    ap.add_argument("model")
    ap.add_argument("--attention", default="exact")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--long", default="", help="text file: adds a prompt of its first --long_chars characters")
    ap.add_argument("--long_chars", type=int, default=3000)
    a = ap.parse_args()
    prompts = list(PROMPTS)
    if a.long:
        prompts.append(open(a.long, encoding="utf-8").read()[:a.long_chars])
    d, f = os.path.dirname(os.path.abspath(a.model)), os.path.basename(a.model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    worst = 0.0
    all_equal = True
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=a.tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        ref_tokens = out.sequences[0, len(ids):].tolist()
        ref_logits = torch.stack(out.scores, 0)[:, 0, :].numpy()  # raw logits (greedy: no processors)
        with tempfile.NamedTemporaryFile(suffix=".f32") as lf:
            r = subprocess.run([a.runner, "--model", a.model, "--prompt_ids", " ".join(map(str, ids)), "--max_tokens",
                                str(a.tokens), "--attention", a.attention, "--logits_out", lf.name],
                               capture_output=True, text=True, check=True)
            ours_logits = np.fromfile(lf.name, dtype=np.float32).reshape(a.tokens, -1)
        ours_tokens = [int(x) for x in r.stdout.split("ids:")[2].split("\n")[0].split()]
        # Logits are comparable while both runs saw the same tokens.
        same = 0
        while same < min(len(ours_tokens), len(ref_tokens)) and ours_tokens[same] == ref_tokens[same]:
            same += 1
        steps = min(same + 1, len(ref_tokens))
        diff = float(np.abs(ours_logits[:steps, :ref_logits.shape[1]] - ref_logits[:steps]).max())
        first = float(np.abs(ours_logits[0, :ref_logits.shape[1]] - ref_logits[0]).max())
        worst = max(worst, diff)
        # transformers stops at the end-of-sequence token; ours runs on: compare up to its stop.
        equal = ours_tokens[:len(ref_tokens)] == ref_tokens
        all_equal &= equal
        print(f"prompt {prompt[:40]!r}: {len(ids)} prompt tokens; greedy tokens equal for {same}/{len(ref_tokens)}"
              f"{' (transformers stopped at end of sequence)' if len(ref_tokens) < a.tokens else ''}; "
              f"max |logit diff| prompt {first:.2e}, over {steps} steps {diff:.2e}")
        if not equal:
            print("   ours:", tok.decode(ours_tokens))
            print("   ref: ", tok.decode(ref_tokens))
        print("   text:", repr(tok.decode(ref_tokens)))
    print(f"attention={a.attention}: max |logit diff| {worst:.2e}; greedy {'IDENTICAL' if all_equal else 'DIFFERENT'} "
          f"(up to {a.tokens} tokens or end of sequence) on {len(prompts)} prompts")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
