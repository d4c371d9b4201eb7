// kvq-local: runs a GGUF model in-process (no store, no server) for reference checks.
//
//   kvq-local --model M.gguf --tokenize FILE          token ids of FILE's text, one line
//   kvq-local --model M.gguf --prompt TEXT [--chat] [--max_tokens N] [--attention exact|fp16|kivi2|...]
//             [--logits_out FILE] [--backend cpu|cuda] greedy generation; ids and text on stdout;
//                                                      with --logits_out, every step's logits (float32)
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#if KVQ_WORKER_HAVE_LOCAL
#include "worker/local_attention.h"
#endif
#include "worker/model.h"

using kvq::worker::AttentionBackend;
using kvq::worker::Model;

int main(int argc, char** argv) {
  std::string model_path, prompt, tokenize, attention = "exact", logits_out, prompt_ids;
  int max_tokens = 32, threads = 0;
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
