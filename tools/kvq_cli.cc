// kvq: command-line client of the worker.
//
//   kvq generate --prompt TEXT [--worker 127.0.0.1:50052] [--chat] [--max_tokens N] [--temperature T]
//                [--top_k K] [--top_p P] [--seed S] [--stop STR]... [--preset NAME]
//                [--session ID] [--keep_session] [--usage] [--ids]
//   kvq info [--worker ...]
// Streams the reply to stdout as it is generated; --usage prints the request's numbers (tokens,
// time to first token, KV bytes stored vs fp16) to stderr at the end.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "worker.grpc.pb.h"

namespace v1 = kvq::v1;

namespace {
void Usage() {
  std::fprintf(stderr,
               "usage: kvq generate --prompt TEXT [--worker HOST:PORT] [--chat] [--max_tokens N] [--temperature T]\n"
               "                    [--top_k K] [--top_p P] [--seed S] [--stop STR]... [--preset NAME]\n"
               "                    [--session ID] [--keep_session] [--usage] [--ids] [--timeout SECONDS]\n"
               "       kvq info [--worker HOST:PORT]\n");
}
const char* FinishName(v1::FinishReason f) {
  switch (f) {
    case v1::FINISH_REASON_LENGTH: return "length";
    case v1::FINISH_REASON_STOP: return "stop";
    case v1::FINISH_REASON_CANCELLED: return "cancelled";
    case v1::FINISH_REASON_CONTEXT: return "context";
    default: return "unspecified";
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    Usage();
    return 2;
  }
  const std::string cmd = argv[1];
  std::string worker = "127.0.0.1:50052";
  v1::GenerateRequest req;
  bool chat = false, usage = false, ids = false;
  std::string prompt;
  double timeout = 600;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvq: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--worker") worker = val();
    else if (a == "--prompt") prompt = val();
    else if (a == "--chat") chat = true;
    else if (a == "--max_tokens") req.set_max_tokens(std::atoi(val().c_str()));
    else if (a == "--temperature") req.set_temperature(std::strtof(val().c_str(), nullptr));
    else if (a == "--top_k") req.set_top_k(std::atoi(val().c_str()));
    else if (a == "--top_p") req.set_top_p(std::strtof(val().c_str(), nullptr));
    else if (a == "--seed") req.set_seed(std::strtoull(val().c_str(), nullptr, 10));
    else if (a == "--stop") req.add_stop(val());
    else if (a == "--preset") req.set_preset(val());
    else if (a == "--session") req.set_session_id(val());
    else if (a == "--keep_session") req.set_keep_session(true);
    else if (a == "--ignore_eos") req.set_ignore_eos(true);
    else if (a == "--usage") usage = true;
    else if (a == "--ids") ids = true;
    else if (a == "--timeout") timeout = std::strtod(val().c_str(), nullptr);
    else {
      std::fprintf(stderr, "kvq: unknown argument %s\n", a.c_str());
      Usage();
      return 2;
    }
  }
  auto channel = grpc::CreateChannel(worker, grpc::InsecureChannelCredentials());
  auto stub = v1::Worker::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(int64_t(timeout * 1000)));
  if (cmd == "info") {
    v1::ModelInfoResponse info;
    auto st = stub->ModelInfo(&ctx, v1::ModelInfoRequest(), &info);
    if (!st.ok()) {
      std::fprintf(stderr, "kvq: %s\n", st.error_message().c_str());
      return 1;
    }
    std::printf("%s", info.DebugString().c_str());
    return 0;
  }
  if (cmd != "generate") {
    Usage();
    return 2;
  }
  if (prompt.empty()) {
    std::fprintf(stderr, "kvq: --prompt is required\n");
    return 2;
  }
  if (chat) {
    auto* m = req.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(prompt);
  } else {
    req.set_text(prompt);
  }
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  v1::GenerateResponse last;
  std::vector<int> out_ids;
  while (reader->Read(&resp)) {
    std::fwrite(resp.text().data(), 1, resp.text().size(), stdout);
    std::fflush(stdout);
    for (int id : resp.token_ids()) out_ids.push_back(id);
    if (resp.done()) last = resp;
  }
  const grpc::Status st = reader->Finish();
  std::printf("\n");
  std::fflush(stdout);
  if (!st.ok()) {
    std::fprintf(stderr, "kvq: generation failed: %s (%d)\n", st.error_message().c_str(), int(st.error_code()));
    return 1;
  }
  if (ids) {
    std::fprintf(stderr, "ids:");
    for (int id : out_ids) std::fprintf(stderr, " %d", id);
    std::fprintf(stderr, "\n");
  }
  if (usage) {
    const auto& u = last.usage();
    // smaller or larger than fp16 (the fp16 preset stores whole pages: larger for a short session)
    const double stored = double(u.kv_stored_bytes()), fp16 = double(u.kv_fp16_equivalent_bytes());
    const bool smaller = stored <= fp16;
    std::fprintf(stderr,
                 "session %s (preset %s): finish %s, %d prompt + %d generated tokens, session holds %d tokens\n"
                 "time to first token %.3f s, total %.3f s (%.1f tokens/s)\n"
                 "KV cache in the store: %lld bytes stored vs %lld bytes as fp16 (%.2fx %s)\n",
                 last.session_id().c_str(), u.preset().c_str(), FinishName(last.finish_reason()), u.prompt_tokens(),
                 u.completion_tokens(), u.session_length(), u.time_to_first_token_s(), u.total_time_s(),
                 u.total_time_s() > u.time_to_first_token_s() && u.completion_tokens() > 1
                     ? (u.completion_tokens() - 1) / (u.total_time_s() - u.time_to_first_token_s())
                     : 0.0,
                 (long long)u.kv_stored_bytes(), (long long)u.kv_fp16_equivalent_bytes(),
                 stored > 0 && fp16 > 0 ? (smaller ? fp16 / stored : stored / fp16) : 0.0, smaller ? "smaller" : "larger");
  }
  return 0;
}
