#include "kvstore/server.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "prometheus/exposer.h"

namespace kvq::store {

absl::StatusOr<std::unique_ptr<StoreServer>> StoreServer::Start(const ServerOptions& options,
                                                               const StoreOptions& store_options,
                                                               std::unique_ptr<Backend> backend,
                                                               TenantRegistry tenants) {
  if (!backend) return absl::InvalidArgumentError("no backend");
  if (options.tls_cert_pem.empty() != options.tls_key_pem.empty())
    return absl::InvalidArgumentError("TLS needs both a certificate and a key");
  if (options.max_message_bytes < 1024 || options.max_message_bytes > (int64_t{1} << 31) - 1)
    return absl::InvalidArgumentError("max_message_bytes must be in [1024, 2^31-1]");
  std::unique_ptr<StoreServer> s(new StoreServer());
  s->tenants_ = std::make_unique<TenantRegistry>(std::move(tenants));
  s->metrics_ = std::make_unique<Metrics>();
  s->store_ = std::make_unique<Store>(store_options, std::move(backend), s->metrics_.get());
  s->service_ = std::make_unique<KVStoreService>(s->store_.get(), s->tenants_.get(), s->metrics_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!options.tls_cert_pem.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({options.tls_key_pem, options.tls_cert_pem});
    creds = grpc::SslServerCredentials(ssl);
  }
  const std::string addr = absl::StrCat(options.host.find(':') != std::string::npos ? "[" + options.host + "]"
                                                                                    : options.host,
                                        ":", options.port);
  builder.AddListeningPort(addr, creds, &s->port_);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  builder.RegisterService(s->service_.get());
  s->server_ = builder.BuildAndStart();
  if (!s->server_ || s->port_ == 0) return absl::UnavailableError("cannot listen on " + addr);
  grpc::HealthCheckServiceInterface* health = s->server_->GetHealthCheckService();
  if (health != nullptr) {
    health->SetServingStatus(true);
    health->SetServingStatus("kvq.v1.KVStore", true);
  }

  if (options.metrics_port >= 0) {
    const std::string maddr = absl::StrCat(options.host, ":", options.metrics_port);
    try {
      s->exposer_ = std::make_unique<prometheus::Exposer>(maddr, 2);
    } catch (const std::exception& e) {
      s->Shutdown(std::chrono::system_clock::now());
      return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", maddr, ": ", e.what()));
    }
    s->collectables_ = s->metrics_->Collectables(s->store_.get());
    for (auto& c : s->collectables_) s->exposer_->RegisterCollectable(c);
    const std::vector<int> ports = s->exposer_->GetListeningPorts();
    s->metrics_port_ = ports.empty() ? -1 : ports[0];
  }
  return s;
}

void StoreServer::Shutdown(std::chrono::system_clock::time_point deadline) {
  if (shut_down_) return;
  shut_down_ = true;
  // The metrics endpoint stops while the calls drain: its HTTP server takes up to two seconds to
  // stop (civetweb's poll quantum), which then overlaps the drain instead of adding to it.
  if (exposer_) exposer_stopper_ = std::thread([this] { exposer_.reset(); });
  if (server_) {
    grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
    if (health != nullptr) health->Shutdown();
    server_->Shutdown(deadline);
  }
}

void StoreServer::Wait() {
  if (server_) server_->Wait();
  if (exposer_stopper_.joinable()) exposer_stopper_.join();
}

StoreServer::~StoreServer() {
  Shutdown(std::chrono::system_clock::now());
  Wait();
}

}  // namespace kvq::store
