// Prometheus metrics of the store (prometheus-cpp). Families are built once at start-up; gauges
// that mirror the store's totals are refreshed at every scrape by a collectable registered ahead
// of the registry. Base units, no session ids as labels.
#pragma once

#include <array>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "kvstore/store.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kvq::store {

class Metrics final : public StoreEvents {
 public:
  Metrics();

  // Collectables to serve, in order (refresh first, then the registry). `store` must outlive them.
  std::vector<std::shared_ptr<prometheus::Collectable>> Collectables(const Store* store);

  // One Attend request: phase prefill when any entry had n > 1.
  void ObserveAttend(const AttendSummary& s, double seconds);
  void CountError(absl::StatusCode code, int64_t n = 1);
  void OnQuotaRejection() override { quota_rejections_->Increment(); }
  // Copies the store's totals into the gauges.
  void Refresh(const StoreStats& st);

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Gauge* sessions_;
  prometheus::Gauge* tokens_;
  prometheus::Gauge* bytes_codes_;
  prometheus::Gauge* bytes_scales_;
  prometheus::Gauge* bytes_full_;
  prometheus::Gauge* bytes_meta_;
  prometheus::Gauge* fp16_equiv_;
  prometheus::Gauge* pool_used_;
  prometheus::Gauge* pool_free_;
  prometheus::Histogram* attend_decode_;
  prometheus::Histogram* attend_prefill_;
  prometheus::Counter* attended_tokens_;
  prometheus::Counter* attend_requests_;
  prometheus::Histogram* batch_entries_;
  prometheus::Histogram* kernel_seconds_;
  prometheus::Counter* quota_rejections_;
  std::array<prometheus::Counter*, 17> errors_{};
};

}  // namespace kvq::store
