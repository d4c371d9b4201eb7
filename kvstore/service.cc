#include "kvstore/service.h"

#include <chrono>
#include <string>
#include <vector>

#include "kvstore/convert.h"

namespace kvq::store {

grpc::StatusCode ToGrpcCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return grpc::StatusCode::OK;
    case absl::StatusCode::kCancelled: return grpc::StatusCode::CANCELLED;
    case absl::StatusCode::kUnknown: return grpc::StatusCode::UNKNOWN;
    case absl::StatusCode::kInvalidArgument: return grpc::StatusCode::INVALID_ARGUMENT;
    case absl::StatusCode::kDeadlineExceeded: return grpc::StatusCode::DEADLINE_EXCEEDED;
    case absl::StatusCode::kNotFound: return grpc::StatusCode::NOT_FOUND;
    case absl::StatusCode::kAlreadyExists: return grpc::StatusCode::ALREADY_EXISTS;
    case absl::StatusCode::kPermissionDenied: return grpc::StatusCode::PERMISSION_DENIED;
    case absl::StatusCode::kResourceExhausted: return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case absl::StatusCode::kFailedPrecondition: return grpc::StatusCode::FAILED_PRECONDITION;
    case absl::StatusCode::kAborted: return grpc::StatusCode::ABORTED;
    case absl::StatusCode::kOutOfRange: return grpc::StatusCode::OUT_OF_RANGE;
    case absl::StatusCode::kUnimplemented: return grpc::StatusCode::UNIMPLEMENTED;
    case absl::StatusCode::kInternal: return grpc::StatusCode::INTERNAL;
    case absl::StatusCode::kUnavailable: return grpc::StatusCode::UNAVAILABLE;
    case absl::StatusCode::kDataLoss: return grpc::StatusCode::DATA_LOSS;
    case absl::StatusCode::kUnauthenticated: return grpc::StatusCode::UNAUTHENTICATED;
    default: return grpc::StatusCode::UNKNOWN;
  }
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(ToGrpcCode(status.code()), std::string(status.message()));
}

absl::StatusOr<Tenant*> KVStoreService::Authenticate(const grpc::CallbackServerContext* ctx) const {
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return tenants_->Authenticate(nullptr);
  const std::string value(it->second.data(), it->second.size());
  return tenants_->Authenticate(&value);
}

grpc::ServerUnaryReactor* KVStoreService::Finish(grpc::CallbackServerContext* ctx, const absl::Status& s) {
  CountError(s);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

grpc::ServerUnaryReactor* KVStoreService::CreateSession(grpc::CallbackServerContext* ctx,
                                                        const v1::CreateSessionRequest* req,
                                                        v1::CreateSessionResponse* resp) {
  auto tenant = Authenticate(ctx);
  if (!tenant.ok()) return Finish(ctx, tenant.status());
  auto spec = SpecFromProto(*req);
  if (!spec.ok()) return Finish(ctx, spec.status());
  auto id = store_->CreateSession(**tenant, *spec);
  if (!id.ok()) return Finish(ctx, id.status());
  resp->set_session_id(*id);
  resp->set_format_version(kvq::kFormatVersion);
  *resp->mutable_config() = ToProto(spec->cache.config);
  return Finish(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KVStoreService::GetSession(grpc::CallbackServerContext* ctx,
                                                     const v1::GetSessionRequest* req, v1::GetSessionResponse* resp) {
  auto tenant = Authenticate(ctx);
  if (!tenant.ok()) return Finish(ctx, tenant.status());
  auto snap = store_->GetSession(**tenant, req->session_id());
  if (!snap.ok()) return Finish(ctx, snap.status());
  ToProto(*snap, resp->mutable_session());
  return Finish(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KVStoreService::DropSession(grpc::CallbackServerContext* ctx,
                                                      const v1::DropSessionRequest* req, v1::DropSessionResponse*) {
  auto tenant = Authenticate(ctx);
  if (!tenant.ok()) return Finish(ctx, tenant.status());
  return Finish(ctx, store_->DropSession(**tenant, req->session_id()));
}

grpc::ServerUnaryReactor* KVStoreService::ListSessions(grpc::CallbackServerContext* ctx,
                                                       const v1::ListSessionsRequest*,
                                                       v1::ListSessionsResponse* resp) {
  auto tenant = Authenticate(ctx);
  if (!tenant.ok()) return Finish(ctx, tenant.status());
  for (const SessionSnapshot& s : store_->ListSessions(**tenant)) ToProto(s, resp->add_sessions());
  return Finish(ctx, absl::OkStatus());
}

void KVStoreService::HandleAttend(Tenant& tenant, const v1::AttendRequest& req, v1::AttendResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  resp->set_step_id(req.step_id());
  resp->set_layer(req.layer());
  const int n = req.entries_size();
  std::vector<AttendOutput> outs(n);
  for (int i = 0; i < n; ++i) outs[i].o = resp->add_results()->mutable_o();
  auto dtype = FromProto(req.dtype());
  AttendSummary summary;
  if (!dtype.ok()) {
    summary.entries = n;
    for (auto& o : outs) o.status = dtype.status();
  } else {
    std::vector<AttendInput> ins(n);
    for (int i = 0; i < n; ++i) {
      const v1::AttendEntry& e = req.entries(i);
      ins[i] = AttendInput{e.session_id(), e.position(), e.num_tokens(), e.q(), e.k(), e.v()};
    }
    summary = store_->Attend(tenant, req.layer(), *dtype, ins, &outs);
  }
  for (int i = 0; i < n; ++i) {
    v1::EntryResult* r = resp->mutable_results(i);
    if (outs[i].status.ok()) {
      r->set_length(outs[i].length);
    } else {
      r->clear_o();
      r->set_code(static_cast<int>(ToGrpcCode(outs[i].status.code())));
      r->set_message(std::string(outs[i].status.message()));
      CountError(outs[i].status);
    }
  }
  if (metrics_ != nullptr)
    metrics_->ObserveAttend(summary, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

namespace {

// One Attend stream: requests are processed strictly in order, one response each; at most one
// read or write is outstanding, so Finish is called exactly once.
class AttendReactor final : public grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse> {
 public:
  AttendReactor(KVStoreService* service, grpc::CallbackServerContext* ctx) : service_(service), ctx_(ctx) {
    auto tenant = service_->Authenticate(ctx);
    if (!tenant.ok()) {
      service_->CountError(tenant.status());
      Finish(ToGrpcStatus(tenant.status()));
      return;
    }
    tenant_ = *tenant;
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed, or the call was cancelled
      Finish(ctx_->IsCancelled() ? grpc::Status::CANCELLED : grpc::Status::OK);
      return;
    }
    if (ctx_->IsCancelled()) {
      Finish(grpc::Status::CANCELLED);
      return;
    }
    if (std::chrono::system_clock::now() > ctx_->deadline()) {
      service_->CountError(absl::DeadlineExceededError(""));
      Finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded before the step ran"));
      return;
    }
    resp_.Clear();
    service_->HandleAttend(*tenant_, req_, &resp_);
    StartWrite(&resp_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the response could not be written"));
      return;
    }
    req_.Clear();
    StartRead(&req_);
  }

  void OnDone() override { delete this; }

 private:
  KVStoreService* service_;
  grpc::CallbackServerContext* ctx_;
  Tenant* tenant_ = nullptr;
  v1::AttendRequest req_;
  v1::AttendResponse resp_;
};

}  // namespace

grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse>* KVStoreService::Attend(
    grpc::CallbackServerContext* ctx) {
  return new AttendReactor(this, ctx);
}

}  // namespace kvq::store
