// kvq-store: the KV-cache store daemon. See --help for the flags; the tenants file format is
// documented at --tenants_file.
#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "kvstore/backend.h"
#include "kvstore/server.h"

ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on (gRPC and metrics)");
ABSL_FLAG(int, port, 50051, "gRPC port (0 = any free port; the chosen port is printed)");
ABSL_FLAG(int, metrics_port, 9400,
          "Prometheus /metrics HTTP port (0 = any free port, -1 = no metrics endpoint)");
ABSL_FLAG(std::string, backend, "auto", "Compute backend: auto (CUDA when built and a GPU is present, else CPU), cpu, cuda");
ABSL_FLAG(int64_t, pool_bytes, int64_t{1} << 30,
          "Bytes of the KV page pool, allocated once at start-up (host memory for cpu, device memory for cuda)");
ABSL_FLAG(int, threads, 0, "CPU backend threads per step (0 = all cores)");
ABSL_FLAG(int, cuda_lanes, 2,
          "CUDA backend: steps that may run at once (1..8), each on its own stream with its own buffers, so "
          "concurrent requests for different sessions overlap their copies and kernels");
ABSL_FLAG(std::string, tenants_file, "",
          "Tenants and quotas. Without it there is one tenant ('default', no quotas) and no token is needed. "
          "Text, one line per token: `<token> <tenant> <max_sessions> <max_tokens> <max_bytes>` "
          "('#' comments, blank lines ignored; quotas are integers, 0 = unlimited; max_tokens sums the "
          "tenant's session lengths, max_bytes its pool bytes). Clients send `authorization: Bearer <token>`.");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate chain file (with --tls_key enables TLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key file (with --tls_cert enables TLS)");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{64} << 20, "Largest gRPC message accepted or sent, in bytes");
ABSL_FLAG(int64_t, max_sessions, 4096, "Most sessions held at once, all tenants together");
ABSL_FLAG(int, max_tokens_per_entry, 8192, "Most new tokens in one Attend entry (prefill chunk size limit)");
ABSL_FLAG(bool, flush_after, false,
          "Quantize each step's next flush right after its attention (on the CUDA backend beside it, not in front "
          "of the next step's attention); the same results either way");
ABSL_FLAG(int, shutdown_grace_s, 10,
          "On SIGTERM/SIGINT: seconds in-flight calls may take to finish before they are cancelled");

namespace {

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

int Fail(const std::string& msg) {
  std::fprintf(stderr, "kvq-store: %s\n", msg.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "the quantized KV-cache store (gRPC service kvq.v1.KVStore, health and reflection on).\n"
      "  kvq-store --port 50051 --metrics_port 9400 --backend cpu --pool_bytes 1073741824");
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = [](absl::string_view f) { return f.find("kvstore/main.cc") != absl::string_view::npos; };
  usage.contains_help_flags = usage.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);

  kvq::store::BackendKind kind;
  if (!kvq::store::ParseBackendKind(absl::GetFlag(FLAGS_backend), &kind))
    return Fail("--backend must be auto, cpu or cuda, got '" + absl::GetFlag(FLAGS_backend) + "'");
  if (absl::GetFlag(FLAGS_max_sessions) < 1) return Fail("--max_sessions must be >= 1");
  if (absl::GetFlag(FLAGS_max_tokens_per_entry) < 1) return Fail("--max_tokens_per_entry must be >= 1");
  if (absl::GetFlag(FLAGS_cuda_lanes) < 1 || absl::GetFlag(FLAGS_cuda_lanes) > kvq::store::kMaxCudaLanes)
    return Fail("--cuda_lanes must be in 1.." + std::to_string(kvq::store::kMaxCudaLanes));

  kvq::store::TenantRegistry tenants;
  if (!absl::GetFlag(FLAGS_tenants_file).empty()) {
    auto loaded = kvq::store::TenantRegistry::Load(absl::GetFlag(FLAGS_tenants_file));
    if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
    tenants = std::move(loaded).value();
  }

  kvq::store::ServerOptions so;
  so.host = absl::GetFlag(FLAGS_host);
  so.port = absl::GetFlag(FLAGS_port);
  so.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  so.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key);
  if (cert.empty() != key.empty()) return Fail("--tls_cert and --tls_key go together");
  if (!cert.empty() && !ReadFile(cert, &so.tls_cert_pem)) return Fail("cannot read --tls_cert " + cert);
  if (!key.empty() && !ReadFile(key, &so.tls_key_pem)) return Fail("cannot read --tls_key " + key);
  kvq::store::StoreOptions sto;
  sto.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  sto.max_tokens_per_entry = absl::GetFlag(FLAGS_max_tokens_per_entry);
  sto.flush_after = absl::GetFlag(FLAGS_flush_after);

  // Block the shutdown signals in every thread (gRPC's and prometheus' threads inherit the mask);
  // the main thread waits for them with sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  kvq::store::BackendOptions bo;
  bo.threads = absl::GetFlag(FLAGS_threads);
  bo.cuda_lanes = absl::GetFlag(FLAGS_cuda_lanes);
  auto backend = kvq::store::MakeBackend(kind, absl::GetFlag(FLAGS_pool_bytes), bo);
  if (!backend.ok()) return Fail("backend: " + std::string(backend.status().message()));
  const std::string backend_name = (*backend)->name();
  auto server = kvq::store::StoreServer::Start(so, sto, std::move(backend).value(), std::move(tenants));
  if (!server.ok()) return Fail(std::string(server.status().message()));
  std::printf("kvq-store: backend %s, pool %lld bytes, grpc port %d, metrics port %d, auth %s\n",
              backend_name.c_str(), static_cast<long long>(absl::GetFlag(FLAGS_pool_bytes)), (*server)->port(),
              (*server)->metrics_port(), (*server)->tenants().auth_required() ? "bearer tokens" : "off");
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  std::printf("kvq-store: signal %d, draining (up to %d s)\n", sig, absl::GetFlag(FLAGS_shutdown_grace_s));
  std::fflush(stdout);
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_shutdown_grace_s)));
  (*server)->Wait();
  std::printf("kvq-store: stopped\n");
  return 0;
}
