// Attention backend over gRPC: the kvq-store (proto/kvstore.proto). One bidirectional Attend
// stream per forward step, one AttendRequest per layer carrying every sequence of the batch.
// A failed entry fails only its sequence: it is left out of the step's later layers and
// reported by TakeFailed, so the engine retries it at the same position.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "kvstore.grpc.pb.h"
#include "worker/attention.h"
#include "worker/engine.h"

namespace kvq::worker {

struct StoreOptions {
  std::string target = "127.0.0.1:50051";  // host:port of kvq-store
  std::string auth_token;                   // sent as "authorization: Bearer <token>" when set
  double rpc_timeout_s = 30;                // deadline of the unary calls and of one step's stream
};

class StoreAttention : public AttentionBackend, public SessionStats {
 public:
  explicit StoreAttention(StoreOptions options);
  absl::StatusOr<std::string> CreateSession(const SessionShape& shape, const std::string& preset) override;
  absl::Status DeleteSession(const std::string& session) override;
  absl::StatusOr<int32_t> SessionLength(const std::string& session) override;
  absl::Status BeginStep() override;
  absl::Status EndStep() override;
  absl::Status Attend(int layer, const std::vector<AttendSeq>& seqs, const std::vector<float>& q,
                      const std::vector<float>& k, const std::vector<float>& v, std::vector<float>* o) override;
  std::vector<std::pair<std::string, absl::Status>> TakeFailed() override;
  absl::Status SessionBytes(const std::string& session, int64_t* stored, int64_t* fp16_equivalent, int32_t* length) override;
  // Round-trip time of the last Attend request (seconds), for metrics.
  double last_round_trip_s() const { return last_rtt_; }
  void set_round_trip_observer(std::function<void(double)> f) { rtt_observer_ = std::move(f); }

 private:
  void Prepare(grpc::ClientContext* ctx, double timeout_s) const;
  absl::StatusOr<kvq::v1::SessionInfo> GetSession(const std::string& session);

  StoreOptions opts_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kvq::v1::KVStore::Stub> stub_;
  std::map<std::string, SessionShape> shapes_;  // sessions this backend created or looked up
  std::unique_ptr<grpc::ClientContext> step_ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<kvq::v1::AttendRequest, kvq::v1::AttendResponse>> stream_;
  uint64_t step_id_ = 0;
  std::vector<std::pair<std::string, absl::Status>> failed_;
  double last_rtt_ = 0;
  std::function<void(double)> rtt_observer_;
};

// gRPC status <-> absl::Status (the codes are the same numbers).
absl::Status FromGrpc(const grpc::Status& st);
grpc::Status ToGrpc(const absl::Status& st);

}  // namespace kvq::worker
