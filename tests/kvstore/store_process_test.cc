// Integration: starts the real kvq-store binary on free ports, talks to it over TCP with the
// generated client (and raw health / reflection calls), scrapes /metrics over HTTP and checks the
// values move, then stops it with SIGTERM.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <regex>
#include <string>
#include <thread>

#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstore.grpc.pb.h"
#include "../metrics_scrape.h"
#include "test_util.h"

#ifndef KVQ_STORE_BINARY
#error "KVQ_STORE_BINARY must name the kvq-store binary"
#endif

namespace kvq::store {
namespace {

using ::kvq::testing_metrics::Metric;
using ::kvq::testing_metrics::Scrape;

constexpr char kToken[] = "integration-token-1";

class StoreProcess {
 public:
  bool Start(const std::string& tenants_file) {
    int out[2];
    if (pipe(out) != 0) return false;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 1);
      close(out[0]);
      close(out[1]);
      execl(KVQ_STORE_BINARY, KVQ_STORE_BINARY, "--host=127.0.0.1", "--port=0", "--metrics_port=0", "--backend=cpu",
            "--pool_bytes=67108864", "--threads=1", "--shutdown_grace_s=5", ("--tenants_file=" + tenants_file).c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
    close(out[1]);
    fd_ = out[0];
    // The first line names the ports: "kvq-store: backend cpu, ..., grpc port P, metrics port M, ...".
    std::string line;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < until) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 200) <= 0) continue;
      char buf[256];
      const ssize_t n = read(fd_, buf, sizeof(buf));
      if (n <= 0) break;
      line.append(buf, static_cast<size_t>(n));
    }
    std::smatch m;
    if (!std::regex_search(line, m, std::regex("grpc port (\\d+), metrics port (\\d+)"))) {
      ADD_FAILURE() << "kvq-store did not report its ports: '" << line << "'";
      return false;
    }
    grpc_port_ = std::stoi(m[1]);
    metrics_port_ = std::stoi(m[2]);
    return true;
  }

  void Terminate() {
    if (pid_ > 0) kill(pid_, SIGTERM);
  }

  // The exit status after SIGTERM (-1 when it did not stop in time).
  int WaitExit() {
    if (pid_ <= 0) return -1;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    int status = 0;
    while (std::chrono::steady_clock::now() < until) {
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

  ~StoreProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) close(fd_);
  }

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  int grpc_port_ = 0, metrics_port_ = 0;
};

// Runs one raw (untyped) unary call through the generic stub.
grpc::Status RawUnary(const std::shared_ptr<grpc::Channel>& ch, const std::string& method, const std::string& request,
                      std::string* response) {
  grpc::GenericStub stub(ch);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Slice slice(request);
  grpc::ByteBuffer req(&slice, 1), resp;
  auto call = stub.PrepareUnaryCall(&ctx, method, req, &cq);
  call->StartCall();
  grpc::Status st;
  call->Finish(&resp, &st, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  std::vector<grpc::Slice> slices;
  if (st.ok() && resp.Dump(&slices).ok())
    for (auto& s : slices) response->append(reinterpret_cast<const char*>(s.begin()), s.size());
  return st;
}

// One request/response on a raw bidirectional stream (for server reflection).
grpc::Status RawStreamOnce(const std::shared_ptr<grpc::Channel>& ch, const std::string& method,
                           const std::string& request, std::string* response) {
  grpc::GenericStub stub(ch);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto call = stub.PrepareCall(&ctx, method, &cq);
  void* tag;
  bool ok;
  auto wait = [&] { return cq.Next(&tag, &ok) && ok; };
  call->StartCall(reinterpret_cast<void*>(1));
  if (!wait()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "start failed");
  grpc::Slice slice(request);
  grpc::ByteBuffer req(&slice, 1), resp;
  call->Write(req, reinterpret_cast<void*>(2));
  if (!wait()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "write failed");
  call->Read(&resp, reinterpret_cast<void*>(3));
  if (!wait()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "read failed");
  call->WritesDone(reinterpret_cast<void*>(4));
  wait();
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  std::vector<grpc::Slice> slices;
  if (resp.Dump(&slices).ok())
    for (auto& s : slices) response->append(reinterpret_cast<const char*>(s.begin()), s.size());
  return st;
}

TEST(StoreProcess, ServesOverTcpAndMetricsMove) {
  char dir_template[] = "/tmp/kvq_store_test_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string tenants = std::string(dir_template) + "/tenants.txt";
  {
    std::ofstream f(tenants);
    f << "# token tenant max_sessions max_tokens max_bytes\n" << kToken << " itest 4 0 0\n";
  }
  StoreProcess proc;
  ASSERT_TRUE(proc.Start(tenants));
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(proc.grpc_port()), grpc::InsecureChannelCredentials());
  ASSERT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)));
  auto stub = v1::KVStore::NewStub(channel);

  // Health (grpc.health.v1, empty HealthCheckRequest) answers SERVING (field 1 = 1).
  std::string health;
  ASSERT_TRUE(RawUnary(channel, "/grpc.health.v1.Health/Check", "", &health).ok());
  EXPECT_EQ(health, std::string("\x08\x01", 2));
  // Reflection lists the service (ServerReflectionRequest{list_services: ""} = field 7, empty).
  std::string services;
  ASSERT_TRUE(RawStreamOnce(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                            std::string("\x3a\x00", 2), &services)
                  .ok());
  EXPECT_NE(services.find("kvq.v1.KVStore"), std::string::npos);

  std::string m0 = Scrape(proc.metrics_port());
  ASSERT_FALSE(m0.empty());
  EXPECT_EQ(Metric(m0, "kvq_store_sessions"), 0);
  EXPECT_EQ(Metric(m0, "kvq_store_pool_bytes{state=\"free\"}"), 67108864);

  // Unauthenticated: refused and counted.
  {
    grpc::ClientContext ctx;
    v1::ListSessionsResponse resp;
    EXPECT_EQ(stub->ListSessions(&ctx, v1::ListSessionsRequest(), &resp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  v1::CreateSessionRequest creq;
  creq.mutable_shape()->set_num_layers(2);
  creq.mutable_shape()->set_num_q_heads(9);
  creq.mutable_shape()->set_num_kv_heads(3);
  creq.mutable_shape()->set_head_dim(64);
  creq.mutable_shape()->set_dtype(v1::DTYPE_F16);
  creq.set_preset(v1::PRESET_KIVI2);
  v1::CreateSessionResponse cresp;
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
    ASSERT_TRUE(stub->CreateSession(&ctx, creq, &cresp).ok());
  }
  testing::TestShape shape;
  shape.hq = 9;
  shape.hkv = 3;
  std::mt19937_64 rng(17);
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
  auto stream = stub->Attend(&ctx);
  int pos = 0;
  for (int step = 0; step < 4; ++step) {
    const int n = step == 0 ? 140 : 1;
    for (int layer = 0; layer < 2; ++layer) {
      v1::AttendRequest req;
      req.set_step_id(step);
      req.set_layer(layer);
      req.set_dtype(v1::DTYPE_F16);
      const testing::StepInput in = testing::RandomStep(shape, n, rng);
      v1::AttendEntry* e = req.add_entries();
      e->set_session_id(cresp.session_id());
      e->set_position(pos);
      e->set_num_tokens(n);
      e->set_q(in.q);
      e->set_k(in.k);
      e->set_v(in.v);
      if (step == 3) {  // plus one entry for a session that does not exist
        v1::AttendEntry* bad = req.add_entries();
        *bad = *e;
        bad->set_session_id("00000000000000000000000000000000");
      }
      ASSERT_TRUE(stream->Write(req));
      v1::AttendResponse resp;
      ASSERT_TRUE(stream->Read(&resp));
      ASSERT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
      EXPECT_EQ(resp.results(0).o().size(), size_t(n) * 9 * 64 * 2);
      if (step == 3) {
        EXPECT_EQ(resp.results(1).code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
      }
    }
    pos += n;
  }
  stream->WritesDone();
  ASSERT_TRUE(stream->Finish().ok());

  const std::string m1 = Scrape(proc.metrics_port());
  EXPECT_EQ(Metric(m1, "kvq_store_sessions"), 1);
  EXPECT_EQ(Metric(m1, "kvq_store_tokens"), pos);
  EXPECT_EQ(Metric(m1, "kvq_store_attended_tokens_total"), 2 * pos);
  EXPECT_EQ(Metric(m1, "kvq_store_attend_requests_total"), 8);
  EXPECT_EQ(Metric(m1, "kvq_store_attend_seconds_count{phase=\"prefill\"}"), 2);
  EXPECT_EQ(Metric(m1, "kvq_store_attend_seconds_count{phase=\"decode\"}"), 6);
  EXPECT_EQ(Metric(m1, "kvq_store_batch_entries_count"), 8);
  EXPECT_EQ(Metric(m1, "kvq_store_batch_entries_sum"), 10);
  EXPECT_EQ(Metric(m1, "kvq_store_errors_total{code=\"NOT_FOUND\"}"), 2);
  EXPECT_EQ(Metric(m1, "kvq_store_errors_total{code=\"UNAUTHENTICATED\"}"), 1);
  EXPECT_EQ(Metric(m1, "kvq_store_fp16_equivalent_bytes"), 2.0 * pos * 3 * 64 * 2 * 2);
  EXPECT_GT(Metric(m1, "kvq_store_bytes{kind=\"codes\"}"), 0);  // kivi2 flushed 128 keys
  EXPECT_GT(Metric(m1, "kvq_store_bytes{kind=\"full_precision\"}"), 0);
  EXPECT_GT(Metric(m1, "kvq_store_pool_bytes{state=\"used\"}"), 0);
  EXPECT_GT(Metric(m1, "kvq_store_kernel_seconds_sum"), 0);
  const double used = Metric(m1, "kvq_store_pool_bytes{state=\"used\"}");
  EXPECT_EQ(used + Metric(m1, "kvq_store_pool_bytes{state=\"free\"}"), 67108864);

  {
    grpc::ClientContext dctx;
    dctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
    v1::DropSessionRequest drop;
    drop.set_session_id(cresp.session_id());
    v1::DropSessionResponse dresp;
    ASSERT_TRUE(stub->DropSession(&dctx, drop, &dresp).ok());
  }
  const std::string m2 = Scrape(proc.metrics_port());
  EXPECT_EQ(Metric(m2, "kvq_store_sessions"), 0);
  EXPECT_EQ(Metric(m2, "kvq_store_tokens"), 0);
  EXPECT_EQ(Metric(m2, "kvq_store_pool_bytes{state=\"used\"}"), 0);
  EXPECT_EQ(Metric(m2, "kvq_store_attended_tokens_total"), 2 * pos);  // counters never go back

  // Graceful shutdown: a stream open at SIGTERM is still served until it closes; new calls are not.
  {
    grpc::ClientContext sctx;
    sctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
    auto s2 = stub->Attend(&sctx);
    v1::AttendRequest req;
    req.set_layer(0);
    req.set_dtype(v1::DTYPE_F16);
    v1::AttendResponse resp;
    ASSERT_TRUE(s2->Write(req));  // no entries: an empty response
    ASSERT_TRUE(s2->Read(&resp));
    proc.Terminate();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    grpc::ClientContext nctx;
    nctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
    nctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
    v1::ListSessionsResponse list;
    EXPECT_FALSE(stub->ListSessions(&nctx, v1::ListSessionsRequest(), &list).ok());
    req.set_step_id(99);
    ASSERT_TRUE(s2->Write(req));
    ASSERT_TRUE(s2->Read(&resp));
    EXPECT_EQ(resp.step_id(), 99u);
    s2->WritesDone();
    EXPECT_TRUE(s2->Finish().ok());
  }
  EXPECT_EQ(proc.WaitExit(), 0);
  std::remove(tenants.c_str());
  rmdir(dir_template);
}

}  // namespace
}  // namespace kvq::store
