#!/usr/bin/env python3
"""Checks the worker's SentencePiece-style tokenizer (GGUF tokenizer.ggml.model = "llama") against
the `sentencepiece` library itself: trains a small BPE model with byte fallback on one text, writes
its vocabulary into a GGUF file the way llama.cpp's converter does (tokens, scores, token types),
and compares ids on every text file given.

  python3 tools/check_spm_tokenizer.py BUILD/tools/kvq-local TRAIN.txt FILE...
Needs: pip install sentencepiece gguf."""
import os
import subprocess
import sys
import tempfile

import gguf
import sentencepiece as spm


def main():
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    runner, train, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    tmp = tempfile.mkdtemp()
    spm.SentencePieceTrainer.train(input=train, model_prefix=f"{tmp}/m", model_type="bpe", vocab_size=4000,
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{tmp}/m.model")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    path = f"{tmp}/spm.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    failures, total = 0, 0
    for f in files:
        text = open(f, encoding="utf-8").read()
        ref = sp.encode(text)
        out = subprocess.run([runner, "--model", path, "--tokenize", f], capture_output=True, text=True, check=True)
        ours = [int(x) for x in out.stdout.split()]
        total += len(ref)
        if ours == ref:
            print(f"{os.path.basename(f)}: {len(ref)} tokens, identical ({out.stderr.strip()})")
        else:
            failures += 1
            i = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            print(f"{os.path.basename(f)}: DIFFERENT at {i}: ours {ours[max(0, i - 3):i + 5]} ref {ref[max(0, i - 3):i + 5]}"
                  f" ({[sp.id_to_piece(x) for x in ref[max(0, i - 3):i + 5]]})")
    print(f"{'PASS' if failures == 0 else 'FAIL'}: {len(files)} files, {total} tokens (sentencepiece {spm.__version__}, vocab 4000, byte fallback)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
