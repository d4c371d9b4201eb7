#include "worker/random_model.h"

#include <cmath>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/status.h"

namespace kvq::worker {
namespace {

// Byte-level (GPT-2) text of one raw byte.
std::string ByteToken(int b) {
  static std::string table[256];
  static bool init = false;
  if (!init) {
    int n = 0;
    for (int x = 0; x < 256; ++x) {
      const bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
      const uint32_t cp = printable ? uint32_t(x) : uint32_t(256 + n++);
      std::string s;
      if (cp < 0x80) s += char(cp);
      else {
        s += char(0xC0 | (cp >> 6));
        s += char(0x80 | (cp & 0x3f));
      }
      table[x] = s;
    }
    init = true;
  }
  return table[b];
}

const char* kWords[] = {" the", " and", " of", " to", " a", " in", " was", " her", " that", " she",
                        "ing", " not", " be", " he", " his", " it", " you", " had", " with", " for",
                        " Elizabeth", " Darcy", " Mr", " Bennet", " said", "hello", " world", " my"};

struct TinyVocab {
  std::vector<std::string> tokens;
  std::vector<double> types;
  std::vector<std::string> merges;
};

TinyVocab BuildTinyVocab(int vocab_extra) {
  TinyVocab v;
  v.tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  v.types = {3, 3, 3};
  for (int b = 0; b < 256; ++b) {
    v.tokens.push_back(ByteToken(b));
    v.types.push_back(1);
  }
  // Merges: every word is built left to right, one merge per new prefix.
  std::vector<std::string> seen(v.tokens.begin(), v.tokens.end());
  auto has = [&](const std::string& t) {
    for (const auto& s : v.tokens) if (s == t) return true;
    return false;
  };
  for (const char* w : kWords) {
    std::string word;
    for (unsigned char c : std::string(w)) word += ByteToken(c);
    // code points of the mapped word (each byte token is 1 or 2 UTF-8 bytes)
    std::vector<std::string> parts;
    for (unsigned char c : std::string(w)) parts.push_back(ByteToken(c));
    std::string prefix = parts[0];
    for (size_t i = 1; i < parts.size(); ++i) {
      const std::string merged = prefix + parts[i];
      if (!has(merged)) {
        v.merges.push_back(prefix + " " + parts[i]);
        v.tokens.push_back(merged);
        v.types.push_back(1);
      }
      prefix = merged;
    }
  }
  for (int i = 0; i < vocab_extra; ++i) {
    v.tokens.push_back(absl::StrCat("<extra_", i, ">"));
    v.types.push_back(1);
  }
  return v;
}

}  // namespace

int TinyVocabSize(int vocab_extra) { return int(BuildTinyVocab(vocab_extra).tokens.size()); }

void WriteTinyTokenizer(GgufWriter* w, int vocab_extra) {
  TinyVocab v = BuildTinyVocab(vocab_extra);
  w->AddString("tokenizer.ggml.model", "gpt2");
  w->AddString("tokenizer.ggml.pre", "smollm");
  w->AddStrings("tokenizer.ggml.tokens", v.tokens);
  w->AddNumbers("tokenizer.ggml.token_type", GgufValueType::kI32, v.types);
  w->AddStrings("tokenizer.ggml.merges", v.merges);
  w->AddNumber("tokenizer.ggml.bos_token_id", GgufValueType::kU32, 1);
  w->AddNumber("tokenizer.ggml.eos_token_id", GgufValueType::kU32, 2);
  w->AddString("tokenizer.chat_template",
               "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
               "You are a tiny test model<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
               "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}");
}

absl::Status WriteRandomModel(const RandomModelSpec& s, GgufWriter* w) {
  if (s.num_layers < 1 || s.d_model < 1 || s.num_heads < 1 || s.num_kv_heads < 1 || s.num_heads % s.num_kv_heads != 0 ||
      s.d_model % s.num_heads != 0 || s.d_ff < 1)
    return absl::InvalidArgumentError("random model: inconsistent shape");
  const int hd = s.d_model / s.num_heads;
  const int vocab = TinyVocabSize(s.vocab_extra);
  w->AddString("general.architecture", "llama");
  w->AddString("general.name", s.name);
  w->AddNumber("general.alignment", GgufValueType::kU32, 32);
  w->AddNumber("llama.block_count", GgufValueType::kU32, s.num_layers);
  w->AddNumber("llama.context_length", GgufValueType::kU32, s.context_length);
  w->AddNumber("llama.embedding_length", GgufValueType::kU32, s.d_model);
  w->AddNumber("llama.feed_forward_length", GgufValueType::kU32, s.d_ff);
  w->AddNumber("llama.attention.head_count", GgufValueType::kU32, s.num_heads);
  w->AddNumber("llama.attention.head_count_kv", GgufValueType::kU32, s.num_kv_heads);
  w->AddNumber("llama.rope.freq_base", GgufValueType::kF32, s.rope_theta);
  w->AddNumber("llama.rope.dimension_count", GgufValueType::kU32, hd);
  w->AddNumber("llama.attention.layer_norm_rms_epsilon", GgufValueType::kF32, 1e-5);
  w->AddNumber("llama.vocab_size", GgufValueType::kU32, vocab);
  WriteTinyTokenizer(w, s.vocab_extra);

  std::mt19937_64 rng(s.seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  auto rand = [&](int64_t in, int64_t out, float scale) {
    std::vector<float> x(static_cast<size_t>(in * out));
    for (auto& e : x) e = n01(rng) * scale;
    return x;
  };
  auto norm = [&](int64_t n) {
    std::vector<float> x(static_cast<size_t>(n));
    for (auto& e : x) e = 1.0f + 0.1f * n01(rng);
    return x;
  };
  const int64_t D = s.d_model, qd = int64_t(s.num_heads) * hd, kvd = int64_t(s.num_kv_heads) * hd;
  KVQ_RETURN_IF_ERROR(w->AddTensor("token_embd.weight", s.weight_type, {D, vocab}, rand(D, vocab, 1.0f)));
  KVQ_RETURN_IF_ERROR(w->AddTensor("output_norm.weight", GgmlType::kF32, {D}, norm(D)));
  if (!s.tied_embeddings)
    KVQ_RETURN_IF_ERROR(w->AddTensor("output.weight", s.weight_type, {D, vocab}, rand(D, vocab, 1.0f / std::sqrt(float(D)))));
  for (int l = 0; l < s.num_layers; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    const float sd = 1.0f / std::sqrt(float(D)), sf = 1.0f / std::sqrt(float(s.d_ff));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "attn_norm.weight", GgmlType::kF32, {D}, norm(D)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "attn_q.weight", s.weight_type, {D, qd}, rand(D, qd, 2 * sd)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "attn_k.weight", s.weight_type, {D, kvd}, rand(D, kvd, 2 * sd)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "attn_v.weight", s.weight_type, {D, kvd}, rand(D, kvd, sd)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "attn_output.weight", s.weight_type, {qd, D}, rand(qd, D, sd)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "ffn_norm.weight", GgmlType::kF32, {D}, norm(D)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "ffn_gate.weight", s.weight_type, {D, int64_t(s.d_ff)}, rand(D, s.d_ff, sd)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "ffn_up.weight", s.weight_type, {D, int64_t(s.d_ff)}, rand(D, s.d_ff, sd)));
    KVQ_RETURN_IF_ERROR(w->AddTensor(p + "ffn_down.weight", s.weight_type, {int64_t(s.d_ff), D}, rand(s.d_ff, D, sf)));
  }
  return absl::OkStatus();
}

}  // namespace kvq::worker
