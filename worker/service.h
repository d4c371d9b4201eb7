// The Generate service (proto/worker.proto) over the engine, and the worker's Prometheus metrics.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "worker.grpc.pb.h"
#include "worker/engine.h"

namespace kvq::worker {

// Metric families, built once (names in base units, no session ids as labels).
class WorkerMetrics {
 public:
  explicit WorkerMetrics(prometheus::Registry& registry);
  EngineObserver Observer();
  void StoreRoundTrip(double s) { store_rtt_->Observe(s); }
  void InFlight(int n) { in_flight_->Set(n); }
  void PromptTokens(int n) { prompt_tokens_->Increment(n); }

 private:
  prometheus::Counter *ok_, *error_, *cancelled_, *tokens_, *prompt_tokens_;
  prometheus::Histogram *ttft_, *itl_, *store_rtt_, *step_s_, *batch_seqs_, *batch_tokens_;
  prometheus::Gauge* in_flight_;
};

class WorkerService final : public kvq::v1::Worker::Service {
 public:
  WorkerService(Engine* engine, WorkerMetrics* metrics) : engine_(engine), metrics_(metrics) {}
  grpc::Status Generate(grpc::ServerContext* ctx, const kvq::v1::GenerateRequest* req,
                        grpc::ServerWriter<kvq::v1::GenerateResponse>* writer) override;
  grpc::Status ModelInfo(grpc::ServerContext* ctx, const kvq::v1::ModelInfoRequest* req,
                         kvq::v1::ModelInfoResponse* resp) override;

 private:
  // Turns the request into engine parameters (tokenizing the prompt); InvalidArgument on bad input.
  absl::StatusOr<GenParams> Parse(const kvq::v1::GenerateRequest& req) const;
  Engine* engine_;
  WorkerMetrics* metrics_;  // may be null
};

}  // namespace kvq::worker
