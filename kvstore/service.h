// The gRPC adapter of the store (callback API). Each handler: authenticate -> validate/convert ->
// core -> status -> metric. The core never sees gRPC; ToGrpcStatus is the one mapping at this
// boundary.
#pragma once

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "kvstore.grpc.pb.h"
#include "kvstore/metrics.h"
#include "kvstore/store.h"
#include "kvstore/tenants.h"

namespace kvq::store {

grpc::StatusCode ToGrpcCode(absl::StatusCode code);
grpc::Status ToGrpcStatus(const absl::Status& status);

class KVStoreService final : public v1::KVStore::CallbackService {
 public:
  // All three must outlive the service. `metrics` may be null.
  KVStoreService(Store* store, const TenantRegistry* tenants, Metrics* metrics)
      : store_(store), tenants_(tenants), metrics_(metrics) {}

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx, const v1::CreateSessionRequest* req,
                                          v1::CreateSessionResponse* resp) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx, const v1::GetSessionRequest* req,
                                       v1::GetSessionResponse* resp) override;
  grpc::ServerUnaryReactor* DropSession(grpc::CallbackServerContext* ctx, const v1::DropSessionRequest* req,
                                        v1::DropSessionResponse* resp) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx, const v1::ListSessionsRequest* req,
                                         v1::ListSessionsResponse* resp) override;
  grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse>* Attend(grpc::CallbackServerContext* ctx) override;

  // One Attend request -> its response (the stream reactor calls this per message).
  void HandleAttend(Tenant& tenant, const v1::AttendRequest& req, v1::AttendResponse* resp);
  absl::StatusOr<Tenant*> Authenticate(const grpc::CallbackServerContext* ctx) const;
  void CountError(const absl::Status& s) {
    if (metrics_ != nullptr && !s.ok()) metrics_->CountError(s.code());
  }

 private:
  grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* ctx, const absl::Status& s);

  Store* store_;
  const TenantRegistry* tenants_;
  Metrics* metrics_;
};

}  // namespace kvq::store
