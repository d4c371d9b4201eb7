// kvq-bench-store: measures Attend round trips on loopback (CPU or CUDA backend).
//
// Starts a store in-process (gRPC on 127.0.0.1, a real TCP connection) or talks to --target;
// --clients client threads (each its own channel and stream, like separate workers) each create
// --batch sessions of the given shape, prefill them in chunks (payload throughput: big messages),
// then run --steps decode steps of --layers requests each (one request per layer with one entry
// per session, as a worker sends them). It reports the round-trip latency distribution, the step
// time and the aggregate tokens/s of all clients over the wall-clock window in which they decode
// together. With --direct (in-process only) the same decode steps also run on the core directly
// (no gRPC, the same client threads) so the wire overhead is visible. With the CUDA backend
// --cuda_lanes sets how many steps the backend runs at once; compare --cuda_lanes 1 with 2 or 4
// at the same --clients.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "grpcpp/grpcpp.h"
#include "kvq/numeric.h"
#include "kvstore.grpc.pb.h"
#include "kvstore/convert.h"
#include "kvstore/cpu_backend.h"
#include "kvstore/server.h"
#if defined(KVQ_BENCH_CUDA_BACKEND)
#include "kvstore/cuda_backend.h"
#endif

ABSL_FLAG(std::string, target, "", "host:port of a running kvq-store (default: start one in-process)");
ABSL_FLAG(std::string, token, "", "Bearer token for --target");
ABSL_FLAG(int, layers, 30, "Layers per session");
ABSL_FLAG(int, batch, 8, "Sessions per client (entries per Attend request)");
ABSL_FLAG(int, clients, 1, "Client threads, each with its own channel, stream, --batch sessions and decode loop");
ABSL_FLAG(int, hq, 9, "Query heads");
ABSL_FLAG(int, hkv, 3, "KV heads");
ABSL_FLAG(int, head_dim, 64, "Head dimension");
ABSL_FLAG(std::string, preset, "kivi2", "Quantization preset");
ABSL_FLAG(int, prefill, 512, "Prefill tokens per session before decoding");
ABSL_FLAG(int, chunk, 256, "Prefill chunk (tokens per entry)");
ABSL_FLAG(int, steps, 32, "Decode steps measured");
ABSL_FLAG(int, warmup, 4, "Decode steps before measuring");
ABSL_FLAG(std::string, backend, "cpu", "Backend of the in-process store: auto, cpu, cuda");
ABSL_FLAG(int, threads, 0, "CPU backend threads (in-process store; 0 = all cores)");
ABSL_FLAG(int, cuda_lanes, 2, "CUDA backend lanes: steps run at once (in-process store; 1..8)");
ABSL_FLAG(bool, flush_after, false, "In-process store: each step's next flush right after its attention (StoreOptions)");
ABSL_FLAG(int64_t, pool_bytes, int64_t{2} << 30, "Pool of the in-process store");
ABSL_FLAG(bool, direct, true, "Also time the same decode steps on the core without gRPC (in-process only)");

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

std::string RandomHalf(size_t count, std::mt19937_64& rng) {
  std::normal_distribution<float> n01(0.f, 1.f);
  std::string s(count * 2, '\0');
  for (size_t i = 0; i < count; ++i) {
    const uint16_t h = kvq::FloatToHalfBits(n01(rng));
    std::memcpy(&s[2 * i], &h, 2);
  }
  return s;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

int Fail(const std::string& m) {
  std::fprintf(stderr, "kvq-bench-store: %s\n", m.c_str());
  return 1;
}

// A reusable barrier (C++17 has no std::barrier): the last thread to arrive runs `on_phase` with
// the phase index before it releases the others; a client that fails drops out so the others do
// not wait for it.
class Barrier {
 public:
  Barrier(int n, std::function<void(int)> on_phase) : n_(n), on_phase_(std::move(on_phase)) {}
  void ArriveAndWait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int phase = phase_;
    if (++arrived_ == n_) {
      Complete();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }
  void ArriveAndDrop() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--n_ > 0 && arrived_ == n_) Complete();
  }

 private:
  void Complete() {
    on_phase_(phase_);
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, arrived_ = 0, phase_ = 0;
  std::function<void(int)> on_phase_;
};

// The barrier phases every client passes through, in order.
enum Phase { kSessionsMade, kPrefilled, kWarmedUp, kDecoded, kDirectWarmedUp, kDirectDone, kNumPhases };

// What one client measured.
struct ClientResult {
  std::string error;
  double prefill_bytes = 0, decode_bytes = 0;
  std::vector<double> rtt, step_s, core;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int layers = absl::GetFlag(FLAGS_layers), batch = absl::GetFlag(FLAGS_batch);
  const int clients = absl::GetFlag(FLAGS_clients);
  const int hq = absl::GetFlag(FLAGS_hq), hkv = absl::GetFlag(FLAGS_hkv), d = absl::GetFlag(FLAGS_head_dim);
  const int prefill = absl::GetFlag(FLAGS_prefill), chunk = std::max(1, absl::GetFlag(FLAGS_chunk));
  const int steps = absl::GetFlag(FLAGS_steps), warmup = absl::GetFlag(FLAGS_warmup);
  kvq::Preset preset;
  if (!kvq::ParsePreset(absl::GetFlag(FLAGS_preset), &preset)) return Fail("unknown --preset");
  if (layers < 1 || batch < 1 || steps < 1 || clients < 1)
    return Fail("--layers, --batch, --steps and --clients must be >= 1");

  std::unique_ptr<kvq::store::StoreServer> server;
  std::string backend_name = "remote";
  std::string target = absl::GetFlag(FLAGS_target);
  if (target.empty()) {
    kvq::store::BackendKind kind;
    if (!kvq::store::ParseBackendKind(absl::GetFlag(FLAGS_backend), &kind)) return Fail("unknown --backend");
    kvq::store::BackendOptions bo;
    bo.threads = absl::GetFlag(FLAGS_threads);
    bo.cuda_lanes = absl::GetFlag(FLAGS_cuda_lanes);
    auto backend = kvq::store::MakeBackend(kind, absl::GetFlag(FLAGS_pool_bytes), bo);
    if (!backend.ok()) return Fail(std::string(backend.status().message()));
    backend_name = (*backend)->name();
    kvq::store::ServerOptions so;
    so.host = "127.0.0.1";
    so.port = 0;
    so.metrics_port = -1;
    so.max_message_bytes = int64_t{256} << 20;
    kvq::store::StoreOptions sto;
    sto.flush_after = absl::GetFlag(FLAGS_flush_after);
    auto s = kvq::store::StoreServer::Start(so, sto, std::move(backend).value(),
                                            kvq::store::TenantRegistry());
    if (!s.ok()) return Fail(std::string(s.status().message()));
    server = std::move(s).value();
    target = "127.0.0.1:" + std::to_string(server->port());
  }
  // The CUDA backend's lanes (in-process only): how many steps really ran at once.
  std::function<int()> max_busy_lanes = [] { return 0; };
  std::function<void()> reset_busy_lanes = [] {};
#if defined(KVQ_BENCH_CUDA_BACKEND)
  if (server)
    if (auto* cuda = dynamic_cast<kvq::store::CudaBackend*>(&server->store().backend())) {
      backend_name += " (" + std::to_string(cuda->num_lanes()) + " lanes)";
      max_busy_lanes = [cuda] { return cuda->max_busy_lanes(); };
      reset_busy_lanes = [cuda] { cuda->ResetMaxBusyLanes(); };
    }
#endif
  const bool direct = server && absl::GetFlag(FLAGS_direct);
  const std::string token = absl::GetFlag(FLAGS_token);

  std::mt19937_64 rng(42);
  // A pool of random inputs reused across requests and clients (generation is not what we
  // measure).
  const std::string q_pool = RandomHalf(size_t(chunk) * hq * d * 4, rng);
  const std::string kv_pool = RandomHalf(size_t(chunk) * hkv * d * 4, rng);

  // Wall-clock time of each phase's end (set by the last client to arrive) and the lanes busy at
  // once during the two measured decode windows.
  std::vector<Clock::time_point> phase_end(kNumPhases);
  int busy_grpc = 0, busy_direct = 0;
  Barrier barrier(clients, [&](int phase) {
    phase_end[phase] = Clock::now();
    if (phase == kWarmedUp || phase == kDirectWarmedUp) reset_busy_lanes();
    if (phase == kDecoded) busy_grpc = max_busy_lanes();
    if (phase == kDirectDone) busy_direct = max_busy_lanes();
  });

  std::vector<ClientResult> results(clients);
  auto client = [&](int ci) {
    ClientResult& res = results[ci];
    auto sync = [&] { barrier.ArriveAndWait(); };
    auto fail = [&](const std::string& m) {
      res.error = "client " + std::to_string(ci) + ": " + m;
      barrier.ArriveAndDrop();
    };
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(256 << 20);
    args.SetMaxSendMessageSize(256 << 20);
    // Its own TCP connection per client, as separate workers would have.
    args.SetInt("grpc.use_local_subchannel_pool", 1);
    auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
    auto stub = kvq::v1::KVStore::NewStub(channel);
    auto auth = [&](grpc::ClientContext* c) {
      if (!token.empty()) c->AddMetadata("authorization", "Bearer " + token);
    };

    std::vector<std::string> ids;
    for (int b = 0; b < batch; ++b) {
      kvq::v1::CreateSessionRequest req;
      req.mutable_shape()->set_num_layers(layers);
      req.mutable_shape()->set_num_q_heads(hq);
      req.mutable_shape()->set_num_kv_heads(hkv);
      req.mutable_shape()->set_head_dim(d);
      req.mutable_shape()->set_dtype(kvq::v1::DTYPE_F16);
      req.set_preset(kvq::store::ToProto(preset));
      kvq::v1::CreateSessionResponse resp;
      grpc::ClientContext ctx;
      auth(&ctx);
      grpc::Status st = stub->CreateSession(&ctx, req, &resp);
      if (!st.ok()) return fail("CreateSession: " + st.error_message());
      ids.push_back(resp.session_id());
    }
    auto fill = [&](kvq::v1::AttendRequest* req, int layer, int pos, int n, uint64_t salt) {
      req->Clear();
      req->set_layer(layer);
      req->set_dtype(kvq::v1::DTYPE_F16);
      for (int b = 0; b < batch; ++b) {
        kvq::v1::AttendEntry* e = req->add_entries();
        e->set_session_id(ids[b]);
        e->set_position(pos);
        e->set_num_tokens(n);
        // Rows of the random pools (4 x chunk tokens), at an offset that changes per request
        // and client.
        const size_t rows = 4 * size_t(chunk);
        const size_t row = ((salt + b + size_t(ci) * 7919) * 2654435761u) % (rows - n + 1);
        const size_t q_row = size_t(hq) * d * 2, kv_row = size_t(hkv) * d * 2;
        e->set_q(q_pool.substr(row * q_row, n * q_row));
        e->set_k(kv_pool.substr(row * kv_row, n * kv_row));
        e->set_v(kv_pool.substr((rows - n - row) * kv_row, n * kv_row));
      }
    };
    sync();  // kSessionsMade

    grpc::ClientContext ctx;
    auth(&ctx);
    auto stream = stub->Attend(&ctx);
    kvq::v1::AttendRequest req;
    kvq::v1::AttendResponse resp;
    std::string entry_error;
    auto round_trip = [&]() -> bool {
      if (!stream->Write(req) || !stream->Read(&resp)) {
        // the stream ended: its status says why (a message over the limit, a failed step)
        const grpc::Status st = stream->Finish();
        entry_error = " (stream status " + std::to_string(st.error_code()) + ": " + st.error_message() + ")";
        return false;
      }
      for (const auto& r : resp.results())
        if (r.code() != 0) {
          entry_error = " (entry error " + std::to_string(r.code()) + ": " + r.message() + ")";
          return false;
        }
      return true;
    };

    // Prefill: big messages (payload throughput).
    int pos = 0;
    while (pos < prefill) {
      const int n = std::min(chunk, prefill - pos);
      for (int l = 0; l < layers; ++l) {
        fill(&req, l, pos, n, pos + l);
        if (!round_trip()) return fail("prefill Attend failed" + entry_error);
        res.prefill_bytes += req.ByteSizeLong() + resp.ByteSizeLong();
      }
      pos += n;
    }
    sync();  // kPrefilled

    // Decode: warm-up steps, then all clients measure together.
    for (int s = 0; s < warmup + steps; ++s) {
      if (s == warmup) sync();  // kWarmedUp
      const auto ts = Clock::now();
      for (int l = 0; l < layers; ++l) {
        fill(&req, l, pos, 1, s * 131 + l);
        const auto t0 = Clock::now();
        if (!round_trip()) return fail("decode Attend failed" + entry_error);
        if (s >= warmup) {
          res.rtt.push_back(Seconds(t0, Clock::now()));
          res.decode_bytes += req.ByteSizeLong() + resp.ByteSizeLong();
        }
      }
      if (s >= warmup) res.step_s.push_back(Seconds(ts, Clock::now()));
      ++pos;
    }
    sync();  // kDecoded
    stream->WritesDone();
    grpc::Status st = stream->Finish();
    if (!st.ok()) return fail("stream: " + st.error_message());
    if (!direct) return;

    // The same decode requests on the core, no gRPC: what the wire adds.
    kvq::store::Store& store = server->store();
    kvq::store::Tenant* tenant = *server->tenants().Authenticate(nullptr);
    for (int s = 0; s < warmup + steps; ++s) {
      if (s == warmup) sync();  // kDirectWarmedUp
      for (int l = 0; l < layers; ++l) {
        fill(&req, l, pos, 1, s * 131 + l);
        std::vector<kvq::store::AttendInput> ins;
        for (const auto& e : req.entries())
          ins.push_back(kvq::store::AttendInput{e.session_id(), e.position(), e.num_tokens(), e.q(), e.k(), e.v()});
        std::vector<std::string> o(ins.size());
        std::vector<kvq::store::AttendOutput> outs(ins.size());
        for (size_t i = 0; i < ins.size(); ++i) outs[i].o = &o[i];
        const auto t0 = Clock::now();
        const auto sum = store.Attend(*tenant, l, kvq::DType::kF16, ins, &outs);
        if (s >= warmup) res.core.push_back(Seconds(t0, Clock::now()));
        if (sum.ok_entries != batch) return fail("direct Attend failed: " + std::string(outs[0].status.message()));
      }
      ++pos;
    }
    sync();  // kDirectDone
  };

  std::vector<std::thread> threads;
  for (int ci = 0; ci < clients; ++ci) threads.emplace_back(client, ci);
  for (auto& t : threads) t.join();
  std::vector<double> rtt, step_s, core;
  double prefill_bytes = 0, decode_bytes = 0;
  for (const ClientResult& r : results) {
    if (!r.error.empty()) return Fail(r.error);
    rtt.insert(rtt.end(), r.rtt.begin(), r.rtt.end());
    step_s.insert(step_s.end(), r.step_s.begin(), r.step_s.end());
    core.insert(core.end(), r.core.begin(), r.core.end());
    prefill_bytes += r.prefill_bytes;
    decode_bytes += r.decode_bytes;
  }

  const double sessions = double(clients) * batch;
  const double prefill_s = Seconds(phase_end[kSessionsMade], phase_end[kPrefilled]);
  const double decode_s = Seconds(phase_end[kWarmedUp], phase_end[kDecoded]);
  std::printf("kvq-bench-store: target %s, backend %s, preset %s, %d layers, %d client(s) x batch %d, Hq %d Hkv %d D %d, fp16\n",
              server ? "in-process (loopback TCP)" : target.c_str(), backend_name.c_str(), kvq::PresetName(preset), layers,
              clients, batch, hq, hkv, d);
  std::printf("prefill: %d tokens/session in chunks of %d: %.1f MB/s payload (req+resp), %.0f tokens/s (all clients, wall clock)\n",
              prefill, chunk, prefill_bytes / prefill_s / 1e6, double(prefill) * sessions / prefill_s);
  std::printf("decode (context %d..%d, %d steps): Attend round trip p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms\n",
              prefill + warmup, prefill + warmup + steps, steps, 1e3 * Percentile(rtt, 0.5), 1e3 * Percentile(rtt, 0.9),
              1e3 * Percentile(rtt, 0.99), 1e3 * Percentile(rtt, 1.0));
  std::printf("decode: step (%d layers) p50 %.2f ms, p90 %.2f ms -> %.1f tokens/s per client, %.1f tokens/s aggregate "
              "(%d clients, wall clock); payload %.1f MB/s, %.1f KB/request\n",
              layers, 1e3 * Percentile(step_s, 0.5), 1e3 * Percentile(step_s, 0.9), double(steps) * batch / decode_s,
              double(steps) * sessions / decode_s, clients, decode_bytes / decode_s / 1e6, decode_bytes / rtt.size() / 1e3);
  if (busy_grpc > 0) std::printf("decode: CUDA lanes busy at once, at most %d\n", busy_grpc);
  if (direct) {
    const double direct_s = Seconds(phase_end[kDirectWarmedUp], phase_end[kDirectDone]);
    std::printf("core only (same requests, no gRPC): p50 %.3f ms, p90 %.3f ms -> wire + service overhead p50 %.3f ms; "
                "%.1f tokens/s aggregate",
                1e3 * Percentile(core, 0.5), 1e3 * Percentile(core, 0.9),
                1e3 * (Percentile(rtt, 0.5) - Percentile(core, 0.5)), double(steps) * sessions / direct_s);
    if (busy_direct > 0) std::printf(", CUDA lanes busy at once at most %d", busy_direct);
    std::printf("\n");
  }
  return 0;
}
