// kvq-gguf-gen: writes a random-weight Llama-shaped GGUF model with a tiny byte-level BPE
// vocabulary. Shapes by flags or by name:
//   kvq-gguf-gen --out tiny.gguf [--layers 2 --d_model 128 --heads 4 --kv_heads 2 --d_ff 256]
//                [--type Q8_0|Q4_0|Q4_1|F16|BF16|F32] [--seed 1] [--vocab_extra 0]
//   kvq-gguf-gen --out big.gguf --shape llama2-7b|llama3-8b|smollm2-135m
#include <cstdio>
#include <cstdlib>
#include <string>

#include "worker/random_model.h"

using namespace kvq::worker;

int main(int argc, char** argv) {
  RandomModelSpec s;
  std::string out, type = "Q8_0", shape;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "kvq-gguf-gen: %s needs a value\n", a.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--out") out = v;
    else if (a == "--layers") s.num_layers = std::atoi(v.c_str());
    else if (a == "--d_model") s.d_model = std::atoi(v.c_str());
    else if (a == "--heads") s.num_heads = std::atoi(v.c_str());
    else if (a == "--kv_heads") s.num_kv_heads = std::atoi(v.c_str());
    else if (a == "--d_ff") s.d_ff = std::atoi(v.c_str());
    else if (a == "--vocab_extra") s.vocab_extra = std::atoi(v.c_str());
    else if (a == "--seed") s.seed = std::strtoull(v.c_str(), nullptr, 10);
    else if (a == "--type") type = v;
    else if (a == "--shape") shape = v;
    else {
      std::fprintf(stderr, "kvq-gguf-gen: unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  if (shape == "llama2-7b") { s.num_layers = 32; s.d_model = 4096; s.num_heads = 32; s.num_kv_heads = 32; s.d_ff = 11008; s.vocab_extra = 32000 - TinyVocabSize(0); }
  else if (shape == "llama3-8b") { s.num_layers = 32; s.d_model = 4096; s.num_heads = 32; s.num_kv_heads = 8; s.d_ff = 14336; s.vocab_extra = 128256 - TinyVocabSize(0); s.rope_theta = 500000.f; s.tied_embeddings = false; }
  else if (shape == "smollm2-135m") { s.num_layers = 30; s.d_model = 576; s.num_heads = 9; s.num_kv_heads = 3; s.d_ff = 1536; s.vocab_extra = 49152 - TinyVocabSize(0); s.rope_theta = 100000.f; }
  else if (!shape.empty()) { std::fprintf(stderr, "kvq-gguf-gen: unknown shape %s\n", shape.c_str()); return 2; }
  if (out.empty()) { std::fprintf(stderr, "kvq-gguf-gen: --out is required\n"); return 2; }
  if (type == "Q8_0") s.weight_type = GgmlType::kQ8_0;
  else if (type == "Q4_0") s.weight_type = GgmlType::kQ4_0;
  else if (type == "Q4_1") s.weight_type = GgmlType::kQ4_1;
  else if (type == "F16") s.weight_type = GgmlType::kF16;
  else if (type == "BF16") s.weight_type = GgmlType::kBF16;
  else if (type == "F32") s.weight_type = GgmlType::kF32;
  else { std::fprintf(stderr, "kvq-gguf-gen: unsupported --type %s\n", type.c_str()); return 2; }
  s.name = shape.empty() ? "random-llama" : "random-" + shape;
  GgufWriter w;
  auto st = WriteRandomModel(s, &w);
  if (st.ok()) st = w.WriteFile(out);
  if (!st.ok()) { std::fprintf(stderr, "kvq-gguf-gen: %s\n", st.ToString().c_str()); return 1; }
  std::printf("%s\n", out.c_str());
  return 0;
}
