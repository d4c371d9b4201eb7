#include "kvstore/metrics.h"

#include "absl/status/status.h"

namespace kvq::store {
namespace {

// Refreshes the gauges from the store when Prometheus scrapes; contributes no families itself.
class RefreshOnCollect final : public prometheus::Collectable {
 public:
  RefreshOnCollect(Metrics* m, const Store* s) : metrics_(m), store_(s) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    metrics_->Refresh(store_->Stats());
    return {};
  }

 private:
  Metrics* metrics_;
  const Store* store_;
};

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  using namespace prometheus;
  sessions_ = &BuildGauge().Name("kvq_store_sessions").Help("Sessions held").Register(*registry_).Add({});
  tokens_ = &BuildGauge()
                 .Name("kvq_store_tokens")
                 .Help("Tokens held: sum over sessions of the session length")
                 .Register(*registry_)
                 .Add({});
  auto& bytes = BuildGauge()
                    .Name("kvq_store_bytes")
                    .Help("Bytes of KV cache stored, by kind (page slack included)")
                    .Register(*registry_);
  bytes_codes_ = &bytes.Add({{"kind", "codes"}});
  bytes_scales_ = &bytes.Add({{"kind", "scales"}});
  bytes_full_ = &bytes.Add({{"kind", "full_precision"}});
  bytes_meta_ = &bytes.Add({{"kind", "metadata"}});
  fp16_equiv_ = &BuildGauge()
                     .Name("kvq_store_fp16_equivalent_bytes")
                     .Help("Bytes the held tokens would take as fp16 K and V")
                     .Register(*registry_)
                     .Add({});
  auto& pool = BuildGauge().Name("kvq_store_pool_bytes").Help("Page pool bytes by state").Register(*registry_);
  pool_used_ = &pool.Add({{"state", "used"}});
  pool_free_ = &pool.Add({{"state", "free"}});
  auto& attend = BuildHistogram()
                     .Name("kvq_store_attend_seconds")
                     .Help("Attend request processing time in the store, by phase")
                     .Register(*registry_);
  attend_decode_ = &attend.Add({{"phase", "decode"}}, LatencyBuckets());
  attend_prefill_ = &attend.Add({{"phase", "prefill"}}, LatencyBuckets());
  attended_tokens_ = &BuildCounter()
                          .Name("kvq_store_attended_tokens_total")
                          .Help("New tokens appended and attended in successful entries")
                          .Register(*registry_)
                          .Add({});
  attend_requests_ = &BuildCounter()
                          .Name("kvq_store_attend_requests_total")
                          .Help("Attend requests processed")
                          .Register(*registry_)
                          .Add({});
  batch_entries_ = &BuildHistogram()
                        .Name("kvq_store_batch_entries")
                        .Help("Entries (sessions) per Attend request")
                        .Register(*registry_)
                        .Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256});
  kernel_seconds_ = &BuildHistogram()
                         .Name("kvq_store_kernel_seconds")
                         .Help("Backend step time per Attend request")
                         .Register(*registry_)
                         .Add({}, LatencyBuckets());
  quota_rejections_ = &BuildCounter()
                           .Name("kvq_store_quota_rejections_total")
                           .Help("Requests or entries refused by a tenant quota")
                           .Register(*registry_)
                           .Add({});
  auto& errors = BuildCounter()
                     .Name("kvq_store_errors_total")
                     .Help("Errors answered (RPCs and Attend entries), by gRPC status code")
                     .Register(*registry_);
  for (int c = 1; c < static_cast<int>(errors_.size()); ++c)
    errors_[c] = &errors.Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
}

std::vector<std::shared_ptr<prometheus::Collectable>> Metrics::Collectables(const Store* store) {
  return {std::make_shared<RefreshOnCollect>(this, store), registry_};
}

void Metrics::ObserveAttend(const AttendSummary& s, double seconds) {
  (s.prefill ? attend_prefill_ : attend_decode_)->Observe(seconds);
  attend_requests_->Increment();
  attended_tokens_->Increment(static_cast<double>(s.tokens));
  batch_entries_->Observe(s.entries);
  if (s.ok_entries > 0) kernel_seconds_->Observe(s.kernel_seconds);
}

void Metrics::CountError(absl::StatusCode code, int64_t n) {
  const int c = static_cast<int>(code);
  if (c <= 0 || c >= static_cast<int>(errors_.size()) || n <= 0) return;
  errors_[c]->Increment(static_cast<double>(n));
}

void Metrics::Refresh(const StoreStats& st) {
  sessions_->Set(st.sessions);
  tokens_->Set(st.tokens);
  bytes_codes_->Set(st.bytes.codes);
  bytes_scales_->Set(st.bytes.scales);
  bytes_full_->Set(st.bytes.full_precision);
  bytes_meta_->Set(st.bytes.metadata);
  fp16_equiv_->Set(st.fp16_equivalent_bytes);
  pool_used_->Set(st.pool_used);
  pool_free_->Set(st.pool_capacity - st.pool_used);
}

}  // namespace kvq::store
