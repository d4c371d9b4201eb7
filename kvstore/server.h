// Assembles a running store: backend + core + gRPC service (with health checking and reflection)
// + the Prometheus endpoint. Used by kvq-store's main and by the in-process tests.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "kvstore/backend.h"
#include "kvstore/metrics.h"
#include "kvstore/service.h"
#include "kvstore/store.h"
#include "kvstore/tenants.h"

namespace prometheus {
class Exposer;
}

namespace kvq::store {

struct ServerOptions {
  std::string host = "0.0.0.0";
  int port = 50051;                      // 0 = any free port (see StoreServer::port)
  int metrics_port = 9400;               // 0 = any free port, -1 = no metrics endpoint
  int64_t max_message_bytes = 64 << 20;  // receive and send limit per message
  std::string tls_cert_pem, tls_key_pem; // PEM contents; both or neither
};

class StoreServer {
 public:
  static absl::StatusOr<std::unique_ptr<StoreServer>> Start(const ServerOptions& options,
                                                           const StoreOptions& store_options,
                                                           std::unique_ptr<Backend> backend, TenantRegistry tenants);
  ~StoreServer();

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  Store& store() { return *store_; }
  Metrics& metrics() { return *metrics_; }
  const TenantRegistry& tenants() const { return *tenants_; }

  // Stops accepting calls, lets in-flight calls finish until `deadline`, then cancels them; the
  // metrics endpoint stops at once. Wait() returns when both are done.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  void Wait();

 private:
  StoreServer() = default;

  std::unique_ptr<TenantRegistry> tenants_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<KVStoreService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::thread exposer_stopper_;
  int port_ = 0;
  int metrics_port_ = -1;
  bool shut_down_ = false;
};

}  // namespace kvq::store
