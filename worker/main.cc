// kvq-worker: the model worker. Loads a GGUF model, serves kvq.v1.Worker/Generate on --port and
// sends every layer's attention to the KV store (--store), or runs it in-process (--attention).
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "kvq/format.h"
#include "worker/engine.h"
#include "worker/model.h"
#include "worker/service.h"
#include "worker/store_attention.h"
#if KVQ_WORKER_HAVE_LOCAL
#include "worker/local_attention.h"
#endif

ABSL_FLAG(int, port, 50052, "gRPC port of the Generate service");
ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on");
ABSL_FLAG(std::string, store, "127.0.0.1:50051", "host:port of kvq-store");
ABSL_FLAG(std::string, store_token, "", "bearer token for the store (tenant), if it requires one");
ABSL_FLAG(std::string, model, "", "path of the GGUF model file");
ABSL_FLAG(std::string, backend, "auto", "compute backend for the transformer: cpu, cuda (cuBLAS matrix products), "
                                         "auto (cuda when built and a GPU is present)");
ABSL_FLAG(std::string, attention, "store", "where attention runs: store (kvq-store over gRPC), local (in-process "
                                           "quantized CPU reference), exact (in-process float, no quantization)");
ABSL_FLAG(int, metrics_port, 9401, "Prometheus /metrics port (0 = off)");
ABSL_FLAG(int, max_batch, 16, "sequences batched per step");
ABSL_FLAG(int, max_step_tokens, 256, "token rows per step (decode tokens plus prefill chunks)");
ABSL_FLAG(int, prefill_chunk, 128, "prompt tokens of one sequence per step (chunked prefill)");
ABSL_FLAG(std::string, default_preset, "kivi2", "quantization preset for new sessions that name none");
ABSL_FLAG(int, threads, 0, "compute threads (0 = all cores)");

namespace {
std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }
}  // namespace

int main(int argc, char** argv) {
  // OpenBLAS reads its core type when it loads: a better one than its own choice means starting again
  // with it (the same process id, arguments and environment but for the variable).
  if (const std::string core = kvq::worker::BlasCoreTypeOverride(); !core.empty()) {
    setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
    std::fprintf(stderr, "kvq-worker: OpenBLAS took a generic x86-64 core for this CPU; starting again with "
                 "OPENBLAS_CORETYPE=%s\n", core.c_str());
    execv("/proc/self/exe", argv);
    std::fprintf(stderr, "kvq-worker: could not start again (%s); going on with OpenBLAS's choice\n", std::strerror(errno));
  }
  absl::SetProgramUsageMessage("kvq-worker --model M.gguf [--store host:port] [--port 50052]");
  absl::ParseCommandLine(argc, argv);
  using namespace kvq::worker;
  const std::string model_path = absl::GetFlag(FLAGS_model);
  if (model_path.empty()) {
    std::fprintf(stderr, "kvq-worker: --model is required\n");
    return 2;
  }
  const std::string compute = absl::GetFlag(FLAGS_backend);
  if (compute != "cpu" && compute != "cuda" && compute != "auto") {
    std::fprintf(stderr, "kvq-worker: unknown --backend %s (cpu, cuda, auto)\n", compute.c_str());
    return 2;
  }
  kvq::Preset preset;
  if (!kvq::ParsePreset(absl::GetFlag(FLAGS_default_preset), &preset)) {
    std::fprintf(stderr, "kvq-worker: unknown --default_preset %s\n", absl::GetFlag(FLAGS_default_preset).c_str());
    return 2;
  }
  auto model = Model::Load(model_path, /*progress=*/true, absl::GetFlag(FLAGS_threads));
  if (!model.ok()) {
    std::fprintf(stderr, "kvq-worker: %s\n", model.status().ToString().c_str());
    return 1;
  }
  if (compute != "cpu") {
    const absl::Status st = (*model)->UseCuda();
    if (!st.ok()) {
      if (compute == "cuda") {
        std::fprintf(stderr, "kvq-worker: %s\n", st.ToString().c_str());
        return 1;
      }
      std::fprintf(stderr, "kvq-worker: --backend auto: computing on the cpu (%s)\n", std::string(st.message()).c_str());
    }
  }
  const ModelConfig& cfg = (*model)->config();
  std::fprintf(stderr, "kvq-worker: model %s (%s): %d layers, %d q heads, %d kv heads, head_dim %d, vocab %d, context %d; compute %s\n",
               cfg.name.c_str(), cfg.arch.c_str(), cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
               cfg.vocab_size, cfg.context_length, (*model)->compute_device().c_str());

  auto registry = std::make_shared<prometheus::Registry>();
  WorkerMetrics metrics(*registry);
  std::unique_ptr<prometheus::Exposer> exposer;
  if (absl::GetFlag(FLAGS_metrics_port) > 0) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(absl::StrCat("0.0.0.0:", absl::GetFlag(FLAGS_metrics_port)));
      exposer->RegisterCollectable(registry);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kvq-worker: cannot serve metrics on port %d: %s\n", absl::GetFlag(FLAGS_metrics_port), e.what());
      return 1;
    }
  }

  std::unique_ptr<AttentionBackend> backend;
  const std::string attention = absl::GetFlag(FLAGS_attention);
  if (attention == "store") {
    StoreOptions so;
    so.target = absl::GetFlag(FLAGS_store);
    so.auth_token = absl::GetFlag(FLAGS_store_token);
    auto sa = std::make_unique<StoreAttention>(so);
    sa->set_round_trip_observer([&metrics](double s) { metrics.StoreRoundTrip(s); });
    backend = std::move(sa);
  } else if (attention == "exact") {
    backend = std::make_unique<ExactAttention>();
#if KVQ_WORKER_HAVE_LOCAL
  } else if (attention == "local") {
    backend = std::make_unique<LocalAttention>(int64_t(2) << 30);
#endif
  } else {
    std::fprintf(stderr, "kvq-worker: unknown --attention %s\n", attention.c_str());
    return 2;
  }

  EngineOptions eo;
  eo.max_batch = absl::GetFlag(FLAGS_max_batch);
  eo.max_step_tokens = absl::GetFlag(FLAGS_max_step_tokens);
  eo.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  eo.default_preset = absl::GetFlag(FLAGS_default_preset);
  Engine engine(model->get(), backend.get(), eo, metrics.Observer());
  WorkerService service(&engine, &metrics);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string addr = absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port));
  int bound_port = 0;
  builder.AddListeningPort(addr, grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    std::fprintf(stderr, "kvq-worker: cannot listen on %s\n", addr.c_str());
    return 1;
  }
  std::fprintf(stderr, "kvq-worker: serving on %s:%d (attention: %s%s), metrics on :%d\n", absl::GetFlag(FLAGS_host).c_str(),
               bound_port, attention.c_str(), attention == "store" ? (" at " + absl::GetFlag(FLAGS_store)).c_str() : "",
               absl::GetFlag(FLAGS_metrics_port));
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::fprintf(stderr, "kvq-worker: shutting down\n");
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  return 0;
}
