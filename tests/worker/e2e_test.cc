// End to end: a real kvq-store process and a real kvq-worker process on loopback, a tiny
// generated model, and gRPC clients: deterministic greedy output equal to the in-process run on
// the same kernels, several concurrent requests, cancellation, sessions kept and continued,
// KV byte accounting, bad requests, and the worker's Prometheus metrics over HTTP.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "../metrics_scrape.h"
#include "kvstore.grpc.pb.h"
#include "worker.grpc.pb.h"
#include "worker/engine.h"
#include "worker/gguf.h"
#include "worker/model.h"
#include "worker/random_model.h"
#if KVQ_WORKER_HAVE_LOCAL
#include "worker/local_attention.h"
#endif

namespace kvq::worker {
namespace {
namespace v1 = ::kvq::v1;

// A child process whose stdout+stderr go to a pipe; Start waits for a line containing `ready`
// and returns the number that follows `port_after` on it.
struct Child {
  pid_t pid = -1;
  FILE* out = nullptr;
  std::string log;

  int Start(const std::vector<std::string>& argv, const std::string& ready, const std::string& port_after) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    pid = fork();
    if (pid == 0) {
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      close(fds[0]);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    close(fds[1]);
    out = fdopen(fds[0], "r");
    char line[4096];
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline && std::fgets(line, sizeof line, out) != nullptr) {
      log += line;
      const std::string l(line);
      if (l.find(ready) == std::string::npos) continue;
      const size_t at = l.find(port_after);
      if (at == std::string::npos) return -1;
      // Drain the rest of the output in the background so the child never blocks on the pipe.
      std::thread([f = out] {
        char buf[4096];
        while (std::fgets(buf, sizeof buf, f) != nullptr) {
        }
      }).detach();
      return std::atoi(l.c_str() + at + port_after.size());
    }
    return -1;
  }
  void Stop() {
    if (pid > 0) {
      kill(pid, SIGTERM);
      int st;
      waitpid(pid, &st, 0);
      pid = -1;
    }
  }
};

// A TCP port on loopback that was free a moment ago (for flags that take no 0 for "any").
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

RandomModelSpec TinySpec() {
  RandomModelSpec s;
  s.num_layers = 2;
  s.d_model = 128;
  s.num_heads = 2;
  s.num_kv_heads = 1;  // head_dim 64, as the store requires
  s.d_ff = 256;
  s.seed = 77;
  return s;
}

class EndToEnd : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::string(KVQ_STORE_BIN).empty()) return;
    model_path_ = ::testing::TempDir() + "/kvq_e2e_tiny_" + std::to_string(getpid()) + ".gguf";
    GgufWriter w;
    ASSERT_TRUE(WriteRandomModel(TinySpec(), &w).ok());
    ASSERT_TRUE(w.WriteFile(model_path_).ok());
    store_ = new Child();
    const int store_port = store_->Start({KVQ_STORE_BIN, "--port", "0", "--metrics_port", "-1", "--backend", "cpu",
                                          "--pool_bytes", "268435456", "--threads", "1"},
                                         "grpc port", "grpc port ");
    ASSERT_GT(store_port, 0) << store_->log;
    store_target_ = "127.0.0.1:" + std::to_string(store_port);
    worker_ = new Child();
    metrics_port_ = FreePort();
    ASSERT_GT(metrics_port_, 0);
    const int worker_port = worker_->Start({KVQ_WORKER_BIN, "--port", "0", "--host", "127.0.0.1", "--metrics_port",
                                            std::to_string(metrics_port_),
                                            "--store", store_target_, "--model", model_path_, "--default_preset", "fp16",
                                            "--threads", "1", "--max_batch", "8", "--prefill_chunk", "8", "--backend", "cpu"},
                                           "serving on", "127.0.0.1:");
    ASSERT_GT(worker_port, 0) << worker_->log;
    worker_target_ = "127.0.0.1:" + std::to_string(worker_port);
  }
  static void TearDownTestSuite() {
    if (worker_ != nullptr) worker_->Stop();
    if (store_ != nullptr) store_->Stop();
    delete worker_;
    delete store_;
    worker_ = store_ = nullptr;
    if (!model_path_.empty()) std::remove(model_path_.c_str());
  }
  void SetUp() override {
    if (std::string(KVQ_STORE_BIN).empty()) GTEST_SKIP() << "kvq-store is not built in this tree";
    ASSERT_NE(worker_, nullptr);
    stub_ = v1::Worker::NewStub(grpc::CreateChannel(worker_target_, grpc::InsecureChannelCredentials()));
    store_stub_ = v1::KVStore::NewStub(grpc::CreateChannel(store_target_, grpc::InsecureChannelCredentials()));
  }

  struct Reply {
    grpc::Status status;
    std::vector<int32_t> tokens;
    std::string session;
    std::string text;
    v1::GenerateResponse last;
  };
  Reply Generate(const v1::GenerateRequest& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto reader = stub_->Generate(&ctx, req);
    Reply r;
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
      if (r.session.empty()) r.session = resp.session_id();
      r.text += resp.text();
      for (int32_t t : resp.token_ids()) r.tokens.push_back(t);
      if (resp.done()) r.last = resp;
    }
    r.status = reader->Finish();
    return r;
  }
  static v1::GenerateRequest Req(const std::vector<int32_t>& prompt, int max_tokens, const std::string& preset) {
    v1::GenerateRequest req;
    for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
    req.set_max_tokens(max_tokens);
    req.set_ignore_eos(true);
    req.set_preset(preset);
    return req;
  }
  bool StoreHas(const std::string& session) {
    grpc::ClientContext ctx;
    v1::GetSessionRequest req;
    req.set_session_id(session);
    v1::GetSessionResponse resp;
    return store_stub_->GetSession(&ctx, req, &resp).ok();
  }

  static std::vector<int32_t> Prompt(int n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& t : p) t = int32_t(3 + rng() % 250);
    return p;
  }

  static Child* store_;
  static Child* worker_;
  static std::string model_path_, store_target_, worker_target_;
  static int metrics_port_;
  std::unique_ptr<v1::Worker::Stub> stub_;
  std::unique_ptr<v1::KVStore::Stub> store_stub_;
};
Child* EndToEnd::store_ = nullptr;
Child* EndToEnd::worker_ = nullptr;
std::string EndToEnd::model_path_, EndToEnd::store_target_, EndToEnd::worker_target_;
int EndToEnd::metrics_port_ = -1;

// The worker serves its Prometheus metrics (the deployment scrapes them) and counts what it did.
// (Every CUDA build of kvq-worker once exited at start-up instead: cuBLAS's thread-local storage,
// linked in, left the metrics server's threads no stack; cuda_matmul.cu.)
TEST_F(EndToEnd, WorkerServesItsMetrics) {
  const Reply r = Generate(Req(Prompt(9, 5), 4, "kivi2"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(r.tokens.size(), 4u);
  const std::string page = testing_metrics::Scrape(metrics_port_);
  ASSERT_FALSE(page.empty()) << "no /metrics page on port " << metrics_port_;
  for (const char* name : {"kvq_worker_generated_tokens_total", "kvq_worker_prompt_tokens_total",
                           "kvq_worker_store_round_trip_seconds_count", "kvq_worker_step_duration_seconds_count",
                           "kvq_worker_time_to_first_token_seconds_count"}) {
    EXPECT_GT(testing_metrics::Metric(page, name), 0.0) << name << " in:\n" << page.substr(0, 2000);
  }
}

#if KVQ_WORKER_HAVE_LOCAL
// The same generation in-process on the kernels' CPU reference (the store's CPU backend runs
// the same code), one request at a time.
std::vector<int32_t> InProcess(const std::string& model_path, const std::vector<int32_t>& prompt, int n,
                               const std::string& preset) {
  auto m = Model::Load(model_path, false, 1);
  EXPECT_TRUE(m.ok());
  LocalAttention attn(int64_t(64) << 20, 1);
  EngineOptions o;
  o.prefill_chunk = 8;
  Engine engine(m->get(), &attn, o);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> out;
  bool done = false;
  GenParams p;
  p.prompt = prompt;
  p.max_tokens = n;
  p.ignore_eos = true;
  p.preset = preset;
  engine.Submit(p, [&](const GenEvent& e) {
    std::lock_guard<std::mutex> l(mu);
    if (e.token >= 0) out.push_back(e.token);
    if (e.done) {
      EXPECT_TRUE(e.error.ok()) << e.error;
      done = true;
      cv.notify_all();
    }
  });
  std::unique_lock<std::mutex> l(mu);
  cv.wait(l, [&] { return done; });
  return out;
}
#endif

TEST_F(EndToEnd, GreedyIsDeterministicAndMatchesTheInProcessRun) {
  int64_t fp16_stored = 0;
  for (const std::string preset : {"fp16", "kivi2", "innerq"}) {
    // 150 prompt tokens: past the 128 full-precision tokens, so the quantized body is read.
    const auto prompt = Prompt(150, 1);
    const Reply a = Generate(Req(prompt, 24, preset));
    ASSERT_TRUE(a.status.ok()) << preset << ": " << a.status.error_message();
    EXPECT_EQ(a.tokens.size(), 24u);
    EXPECT_EQ(a.last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(a.last.usage().preset(), preset);
    EXPECT_GT(a.last.usage().kv_stored_bytes(), 0);
    EXPECT_GT(a.last.usage().kv_fp16_equivalent_bytes(), 0);
    EXPECT_EQ(a.last.usage().session_length(), 150 + 24 - 1);
    // The store counts whole pages (128 tokens), so at 173 tokens only kivi2 is already smaller
    // than the fp16 preset's pages; innerq's sink and window pages still outweigh its body.
    if (preset == "fp16") fp16_stored = a.last.usage().kv_stored_bytes();
    if (preset == "kivi2") {
      EXPECT_LT(a.last.usage().kv_stored_bytes(), fp16_stored) << a.last.usage().ShortDebugString();
    }
    const Reply b = Generate(Req(prompt, 24, preset));
    EXPECT_EQ(a.tokens, b.tokens) << preset;
    EXPECT_NE(a.session, b.session);
#if KVQ_WORKER_HAVE_LOCAL
    EXPECT_EQ(a.tokens, InProcess(model_path_, prompt, 24, preset)) << preset;
#endif
    EXPECT_FALSE(StoreHas(a.session)) << "session not kept must be dropped";
  }
}

TEST_F(EndToEnd, ConcurrentRequestsEqualTheirSoloRuns) {
  constexpr int kN = 5;
  std::vector<std::vector<int32_t>> solo(kN);
  for (int i = 0; i < kN; ++i) {
    const Reply r = Generate(Req(Prompt(5 + 7 * i, 10 + uint64_t(i)), 16, "kivi2"));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    solo[size_t(i)] = r.tokens;
  }
  std::vector<Reply> got(kN);
  std::vector<std::thread> threads;
  for (int i = 0; i < kN; ++i)
    threads.emplace_back([&, i] { got[size_t(i)] = Generate(Req(Prompt(5 + 7 * i, 10 + uint64_t(i)), 16, "kivi2")); });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(got[size_t(i)].status.ok()) << got[size_t(i)].status.error_message();
    EXPECT_EQ(got[size_t(i)].tokens, solo[size_t(i)]) << "request " << i;
  }
}

TEST_F(EndToEnd, CancellationDropsOrKeepsTheSession) {
  for (bool keep : {false, true}) {
    grpc::ClientContext ctx;
    auto req = Req(Prompt(6, 3), 100000, "kivi2");
    req.set_keep_session(keep);
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse resp;
    std::string session;
    int tokens = 0;
    while (tokens < 3 && reader->Read(&resp)) {
      if (session.empty()) session = resp.session_id();
      tokens += resp.token_ids_size();
    }
    ASSERT_EQ(tokens, 3);
    ctx.TryCancel();
    while (reader->Read(&resp)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    // The worker ends the request at its next step boundary.
    bool has = !keep;
    for (int i = 0; i < 200 && has != keep; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      has = StoreHas(session);
    }
    EXPECT_EQ(has, keep) << "keep_session " << keep;
  }
}

TEST_F(EndToEnd, KeptSessionContinues) {
  auto first = Req(Prompt(7, 4), 5, "fp16");
  first.set_keep_session(true);
  const Reply a = Generate(first);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  EXPECT_EQ(a.last.usage().session_length(), 12);
  EXPECT_TRUE(StoreHas(a.session));
  auto second = Req(Prompt(3, 5), 4, "");
  second.set_session_id(a.session);
  const Reply b = Generate(second);
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(b.session, a.session);
  // One long prompt in a fresh session gives the same continuation.
  std::vector<int32_t> whole = Prompt(7, 4);
  whole.insert(whole.end(), a.tokens.begin(), a.tokens.end());
  const auto p2 = Prompt(3, 5);
  whole.insert(whole.end(), p2.begin(), p2.end());
  const Reply c = Generate(Req(whole, 4, "fp16"));
  EXPECT_EQ(b.tokens, c.tokens);
  EXPECT_FALSE(StoreHas(a.session));  // the second request did not keep it
}

TEST_F(EndToEnd, TextPromptsStreamTextAndBadRequestsAreRejected) {
  v1::GenerateRequest req;
  req.set_text("hello world, the");
  req.set_max_tokens(8);
  req.set_ignore_eos(true);
  const Reply r = Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 8u);
  v1::GenerateRequest bad = Req(Prompt(3, 1), 4, "no-such-preset");
  EXPECT_EQ(Generate(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest empty;
  EXPECT_EQ(Generate(empty).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest big = Req({1 << 30}, 4, "fp16");
  EXPECT_EQ(Generate(big).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest lost = Req(Prompt(3, 1), 4, "");
  lost.set_session_id("0123456789abcdef0123456789abcdef");
  EXPECT_EQ(Generate(lost).status.error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::ClientContext ctx;
  v1::ModelInfoResponse info;
  ASSERT_TRUE(stub_->ModelInfo(&ctx, v1::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.num_layers(), 2);
  EXPECT_EQ(info.head_dim(), 64);
}

}  // namespace
}  // namespace kvq::worker
