// kvq-local: runs a GGUF model in-process (no store, no server) for reference checks.
//
//   kvq-local --model M.gguf --tokenize FILE          token ids of FILE's text, one line
//   kvq-local --model M.gguf --prompt TEXT [--chat] [--max_tokens N] [--attention exact|fp16|kivi2|...]
//             [--logits_out FILE] [--backend cpu|cuda] greedy generation; ids and text on stdout;
//                                                      with --logits_out, every step's logits (float32)
//   kvq-local --model M.gguf --perplexity FILE [--ppl_skip_chars C] [--ppl_prefill M] [--ppl_tokens N]
//             [--ppl_chunk K] [--attention exact,fp16,kivi2,...]
//             teacher-forced perplexity: FILE's text from character C is tokenized, its first M
//             tokens are prefilled in chunks of K, then the next tokens are fed ONE per decode step
//             (so the quantized body of the cache is read); -log p(next token) is summed in double
//             over N scored tokens (the first is predicted by the prefill's last logits). A
//             comma-separated --attention runs each preset in turn on the same tokens.
#include <cmath>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"

#if KVQ_WORKER_HAVE_LOCAL
#include "worker/local_attention.h"
#endif
#include "worker/model.h"

using kvq::worker::AttentionBackend;
using kvq::worker::Model;

namespace {

// -log softmax(logits)[target], in double (max-shifted log-sum-exp).
double NegLogProb(const std::vector<float>& logits, int32_t target) {
  double mx = -INFINITY;
  for (float v : logits) mx = std::max(mx, double(v));
  double sum = 0;
  for (float v : logits) sum += std::exp(double(v) - mx);
  return (mx + std::log(sum)) - double(logits[size_t(target)]);
}

std::unique_ptr<AttentionBackend> MakeBackend(const std::string& attention) {
  if (attention == "exact") return std::make_unique<kvq::worker::ExactAttention>();
#if KVQ_WORKER_HAVE_LOCAL
  return std::make_unique<kvq::worker::LocalAttention>(int64_t(1) << 30);
#else
  return nullptr;
#endif
}

struct PplResult {
  int scored = 0;
  double nll_sum = 0;
  double prefill_s = 0, decode_s = 0;
};

// Prefills ids[0, prefill) in chunks, then feeds ids[prefill, prefill + scored - 1) one token per
// step; scores ids[prefill .. prefill + scored - 1] against the logits that precede each.
absl::Status RunPerplexity(Model& model, const std::string& attention, const std::vector<int32_t>& ids, int prefill,
                           int scored, int chunk, PplResult* r) {
  auto attn = MakeBackend(attention);
  if (attn == nullptr) return absl::FailedPreconditionError("built without the in-process quantized backend");
  auto sid = attn->CreateSession(model.config().session_shape(), attention == "exact" ? "fp16" : attention);
  if (!sid.ok()) return sid.status();
  std::vector<float> logits;
  const size_t vocab_check = size_t(model.config().vocab_size);
  auto t0 = std::chrono::steady_clock::now();
  for (int pos = 0; pos < prefill; pos += chunk) {
    const int n = std::min(chunk, prefill - pos);
    std::vector<int32_t> part(ids.begin() + pos, ids.begin() + pos + n);
    auto st = model.Forward({{*sid, pos, part, pos + n == prefill}}, attn.get(), &logits);
    if (!st.ok()) return st;
  }
  auto t1 = std::chrono::steady_clock::now();
  r->prefill_s = std::chrono::duration<double>(t1 - t0).count();
  r->scored = 0;
  r->nll_sum = 0;
  for (int i = 0; i < scored; ++i) {
    const int target_pos = prefill + i;
    if (i > 0) {  // feed the previous (true) token as one decode step
      auto st = model.Forward({{*sid, target_pos - 1, {ids[size_t(target_pos - 1)]}, true}}, attn.get(), &logits);
      if (!st.ok()) return st;
    }
    if (logits.size() != vocab_check) return absl::InternalError("logits size differs from the vocabulary");
    const double nll = NegLogProb(logits, ids[size_t(target_pos)]);
    if (!std::isfinite(nll)) return absl::InternalError("non-finite log-probability at position " + std::to_string(target_pos));
    r->nll_sum += nll;
    ++r->scored;
  }
  r->decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  return attn->DeleteSession(*sid);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, prompt, tokenize, attention = "exact", logits_out, prompt_ids;
  int max_tokens = 32, threads = 0;
  std::string perplexity;
  long ppl_skip_chars = 0;
  int ppl_prefill = 512, ppl_tokens = 1024, ppl_chunk = 128;
  bool chat = false;
  std::string backend = "cpu";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&](const char* what) -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvq-local: %s needs a value\n", what);
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model") model_path = next("--model");
    else if (a == "--prompt") prompt = next("--prompt");
    else if (a == "--prompt_ids") prompt_ids = next("--prompt_ids");
    else if (a == "--tokenize") tokenize = next("--tokenize");
    else if (a == "--attention") attention = next("--attention");
    else if (a == "--logits_out") logits_out = next("--logits_out");
    else if (a == "--max_tokens") max_tokens = std::atoi(next("--max_tokens").c_str());
    else if (a == "--threads") threads = std::atoi(next("--threads").c_str());
    else if (a == "--perplexity") perplexity = next("--perplexity");
    else if (a == "--ppl_skip_chars") ppl_skip_chars = std::atol(next("--ppl_skip_chars").c_str());
    else if (a == "--ppl_prefill") ppl_prefill = std::atoi(next("--ppl_prefill").c_str());
    else if (a == "--ppl_tokens") ppl_tokens = std::atoi(next("--ppl_tokens").c_str());
    else if (a == "--ppl_chunk") ppl_chunk = std::atoi(next("--ppl_chunk").c_str());
    else if (a == "--chat") chat = true;
    else if (a == "--backend") backend = next("--backend");
    else {
      std::fprintf(stderr, "kvq-local: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (model_path.empty()) {
    std::fprintf(stderr, "kvq-local: --model is required\n");
    return 2;
  }
  if (!tokenize.empty()) {  // the tokenizer alone: any GGUF file with tokenizer metadata
    auto file = kvq::worker::GgufFile::Open(model_path);
    if (!file.ok()) { std::fprintf(stderr, "kvq-local: %s\n", file.status().ToString().c_str()); return 1; }
    auto t = kvq::worker::Tokenizer::FromGguf(**file);
    if (!t.ok()) { std::fprintf(stderr, "kvq-local: %s\n", t.status().ToString().c_str()); return 1; }
    std::ifstream f(tokenize, std::ios::binary);
    if (!f) { std::fprintf(stderr, "kvq-local: cannot read %s\n", tokenize.c_str()); return 1; }
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto t0 = std::chrono::steady_clock::now();
    auto ids = t->Encode(text);
    auto t1 = std::chrono::steady_clock::now();
    std::string line;
    for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
    std::printf("%s\n", line.c_str());
    std::fprintf(stderr, "%zu tokens in %.2f s; round trip %s\n", ids.size(), std::chrono::duration<double>(t1 - t0).count(),
                 t->Decode(ids) == text ? "exact" : "DIFFERS");
    return 0;
  }
  if (!perplexity.empty() && (ppl_prefill < 1 || ppl_tokens < 1 || ppl_chunk < 1 || ppl_skip_chars < 0)) {
    std::fprintf(stderr, "kvq-local: --ppl_prefill, --ppl_tokens, --ppl_chunk must be >= 1, --ppl_skip_chars >= 0\n");
    return 2;
  }
  auto model_or = Model::Load(model_path, /*progress=*/true, threads);
  if (!model_or.ok()) {
    std::fprintf(stderr, "kvq-local: %s\n", model_or.status().ToString().c_str());
    return 1;
  }
  Model& model = **model_or;
  if (backend == "cuda") {
    const auto st = model.UseCuda();
    if (!st.ok()) {
      std::fprintf(stderr, "kvq-local: %s\n", st.ToString().c_str());
      return 1;
    }
    std::fprintf(stderr, "kvq-local: compute on %s\n", model.compute_device().c_str());
  }
  const auto* tok = model.tokenizer();
  if (!tokenize.empty()) {
    if (tok == nullptr) { std::fprintf(stderr, "kvq-local: model has no tokenizer\n"); return 1; }
    std::ifstream f(tokenize, std::ios::binary);
    if (!f) { std::fprintf(stderr, "kvq-local: cannot read %s\n", tokenize.c_str()); return 1; }
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto t0 = std::chrono::steady_clock::now();
    auto ids = tok->Encode(text);
    auto t1 = std::chrono::steady_clock::now();
    std::string line;
    for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
    std::printf("%s\n", line.c_str());
    std::fprintf(stderr, "%zu tokens in %.2f s; round trip %s\n", ids.size(), std::chrono::duration<double>(t1 - t0).count(),
                 tok->Decode(ids) == text ? "exact" : "DIFFERS");
    return 0;
  }
  if (!perplexity.empty()) {
    if (tok == nullptr) { std::fprintf(stderr, "kvq-local: model has no tokenizer\n"); return 1; }
    std::ifstream f(perplexity, std::ios::binary);
    if (!f) { std::fprintf(stderr, "kvq-local: cannot read %s\n", perplexity.c_str()); return 1; }
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (size_t(ppl_skip_chars) >= text.size()) {
      std::fprintf(stderr, "kvq-local: --ppl_skip_chars %ld is past the end of %s (%zu bytes)\n", ppl_skip_chars,
                   perplexity.c_str(), text.size());
      return 1;
    }
    // Tokenize only a generous window (16 bytes per needed token) of the text after the skip.
    const size_t need = size_t(ppl_prefill) + size_t(ppl_tokens);
    text = text.substr(size_t(ppl_skip_chars), std::min(text.size() - size_t(ppl_skip_chars), need * 16 + 64));
    const auto ids = tok->Encode(text);
    if (ids.size() < need) {
      std::fprintf(stderr, "kvq-local: %s gives %zu tokens after the skip; %zu needed (prefill + scored)\n",
                   perplexity.c_str(), ids.size(), need);
      return 1;
    }
    if (int64_t(need) > int64_t(model.config().context_length) && model.config().context_length > 0)
      std::fprintf(stderr, "kvq-local: note: %zu tokens exceed the model's context length %d\n", need,
                   int(model.config().context_length));
    std::printf("perplexity: %s from byte %ld, prefill %d tokens (chunks of %d), %d tokens scored one per decode step\n",
                perplexity.c_str(), ppl_skip_chars, ppl_prefill, ppl_chunk, ppl_tokens);
    std::printf("%-12s %8s %10s %12s %10s %12s\n", "attention", "scored", "mean_nll", "perplexity", "prefill_s",
                "decode_ms/tok");
    std::stringstream presets(attention);
    std::string preset;
    int failures = 0;
    while (std::getline(presets, preset, ',')) {
      if (preset.empty()) continue;
      PplResult r;
      const auto st = RunPerplexity(model, preset, ids, ppl_prefill, ppl_tokens, ppl_chunk, &r);
      if (!st.ok()) {
        std::fprintf(stderr, "kvq-local: %s: %s\n", preset.c_str(), st.ToString().c_str());
        ++failures;
        continue;
      }
      const double mean = r.nll_sum / r.scored;
      std::printf("%-12s %8d %10.5f %12.4f %10.2f %12.2f\n", preset.c_str(), r.scored, mean, std::exp(mean),
                  r.prefill_s, r.scored > 1 ? 1000 * r.decode_s / (r.scored - 1) : 0.0);
      std::fflush(stdout);
    }
    return failures == 0 ? 0 : 1;
  }
  std::vector<int32_t> ids;
  if (!prompt_ids.empty()) {
    std::istringstream ss(prompt_ids);
    int v;
    while (ss >> v) ids.push_back(v);
  } else {
    if (tok == nullptr) { std::fprintf(stderr, "kvq-local: model has no tokenizer; use --prompt_ids\n"); return 1; }
    ids = tok->Encode(chat ? tok->ApplyChatTemplate({{"user", prompt}}) : prompt);
  }
  std::unique_ptr<AttentionBackend> attn;
  if (attention == "exact") attn = std::make_unique<kvq::worker::ExactAttention>();
#if KVQ_WORKER_HAVE_LOCAL
  else attn = std::make_unique<kvq::worker::LocalAttention>(int64_t(1) << 30);
#else
  else { std::fprintf(stderr, "kvq-local: built without the in-process quantized backend\n"); return 1; }
#endif
  auto sid = attn->CreateSession(model.config().session_shape(), attention == "exact" ? "fp16" : attention);
  if (!sid.ok()) { std::fprintf(stderr, "kvq-local: %s\n", sid.status().ToString().c_str()); return 1; }
  std::ofstream lo;
  if (!logits_out.empty()) lo.open(logits_out, std::ios::binary);
  std::vector<int32_t> out;
  std::vector<float> logits;
  int32_t pos = 0;
  std::vector<int32_t> feed = ids;
  auto t0 = std::chrono::steady_clock::now();
  double prefill_s = 0;
  for (int step = 0; step < max_tokens; ++step) {
    auto st = model.Forward({{*sid, pos, feed, true}}, attn.get(), &logits);
    if (!st.ok()) { std::fprintf(stderr, "kvq-local: %s\n", st.ToString().c_str()); return 1; }
    if (step == 0) prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (lo) lo.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * 4));
    pos += int32_t(feed.size());
    int32_t best = 0;
    for (size_t i = 1; i < logits.size(); ++i)
      if (logits[i] > logits[size_t(best)]) best = int32_t(i);
    out.push_back(best);
    feed = {best};
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::string line;
  for (size_t i = 0; i < out.size(); ++i) line += (i ? " " : "") + std::to_string(out[i]);
  std::printf("prompt_ids:");
  for (int32_t v : ids) std::printf(" %d", v);
  std::printf("\nids: %s\n", line.c_str());
  if (tok != nullptr) std::printf("text: %s\n", tok->Decode(out).c_str());
  std::fprintf(stderr, "prefill %zu tokens %.3f s; %d decode steps %.3f s (%.1f ms/token)\n", ids.size(), prefill_s,
               max_tokens - 1, total - prefill_s, max_tokens > 1 ? 1000 * (total - prefill_s) / (max_tokens - 1) : 0.0);
  return 0;
}
