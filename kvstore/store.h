// The store core: sessions, admission, quotas, validation and batched Attend steps over a Backend.
// No gRPC or protobuf here: the service adapter (service.h) converts messages and statuses.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvq/cache.h"
#include "kvq/format.h"
#include "kvstore/backend.h"
#include "kvstore/tenants.h"

namespace kvq::store {

struct StoreOptions {
  int64_t max_sessions = 4096;      // across all tenants
  int32_t max_tokens_per_entry = 8192;  // n of one Attend entry
  // Each step's next flush runs right after its attention (kvq::LayerCache::PlanFlushAfter, the
  // backends' flush_after): on the CUDA backend beside the attention instead of in front of the
  // next step's. A step whose flush after cannot get its pages (pool, quota) runs without it.
  bool flush_after = false;
};

// What a session serves: the model shape and the cache format.
struct SessionSpec {
  int32_t num_layers = 0;
  int32_t num_q_heads = 0;
  kvq::CacheShape cache;            // num_kv_heads, head_dim, dtype, config
  bool has_preset = false;          // created from a preset (else an explicit config)
  kvq::Preset preset = kvq::Preset::kFp16;
  int32_t max_tokens = 0;           // 0 = no per-session cap
  float softmax_scale = 0.f;        // 0 = 1/sqrt(D)
};

struct SessionSnapshot {
  std::string id;
  SessionSpec spec;
  std::vector<int32_t> layer_lengths;
  std::vector<int32_t> layer_min_positions;
  kvq::CacheBytes bytes;
  int64_t fp16_equivalent_bytes = 0;
};

// One entry of an Attend request; the views point into the caller's buffers.
struct AttendInput {
  std::string_view session_id;
  int32_t position = 0;
  int32_t num_tokens = 0;
  std::string_view q, k, v;         // raw little-endian activation bytes
};

struct AttendOutput {
  absl::Status status;
  std::string* o = nullptr;         // set by the caller; filled with [n, Hq, D] on success
  int32_t length = 0;               // layer length after the step
};

struct AttendSummary {
  int32_t entries = 0;
  int32_t ok_entries = 0;
  int64_t tokens = 0;               // new tokens attended in successful entries
  bool prefill = false;             // some entry had n > 1
  double kernel_seconds = 0;        // backend time, all groups
};

// Totals over all sessions, for metrics.
struct StoreStats {
  int64_t sessions = 0;
  int64_t tokens = 0;               // sum of session lengths
  kvq::CacheBytes bytes;
  int64_t fp16_equivalent_bytes = 0;
  int64_t pool_capacity = 0;
  int64_t pool_used = 0;
};

// Optional hooks the metrics layer implements.
class StoreEvents {
 public:
  virtual ~StoreEvents() = default;
  virtual void OnQuotaRejection() = 0;
};

class Store {
 public:
  Store(StoreOptions options, std::unique_ptr<Backend> backend, StoreEvents* events = nullptr);
  ~Store();  // releases every session's pages
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // INVALID_ARGUMENT for a bad spec, RESOURCE_EXHAUSTED for the session limits.
  absl::StatusOr<std::string> CreateSession(Tenant& tenant, const SessionSpec& spec);
  // NOT_FOUND for unknown ids and for other tenants' sessions alike.
  absl::StatusOr<SessionSnapshot> GetSession(Tenant& tenant, std::string_view id);
  absl::Status DropSession(Tenant& tenant, std::string_view id);
  std::vector<SessionSnapshot> ListSessions(Tenant& tenant);

  // Runs one layer's step for every entry: validates each entry, plans them, runs all planned
  // entries as one backend call per model shape (one call when all sessions share a shape), then
  // commits. A failed entry leaves its session untouched and does not affect the others.
  // `outputs` must have one element per input, with `o` set.
  AttendSummary Attend(Tenant& tenant, int32_t layer, kvq::DType dtype, const std::vector<AttendInput>& inputs,
                       std::vector<AttendOutput>* outputs);

  StoreStats Stats() const;
  Backend& backend() { return *backend_; }

  // Validates a spec (also used by the service before it builds one). "" when fine.
  static std::string ValidateSpec(const SessionSpec& spec);

 private:
  struct Session;
  struct Planned;

  std::shared_ptr<Session> Find(Tenant& tenant, std::string_view id) const;
  SessionSnapshot Snapshot(const Session& s) const;
  void ReleaseLocked(Session& s);
  void QuotaRejected();
  // After a commit: refreshes the session's cached totals and the store's.
  void Resettle(Session& s);

  const StoreOptions options_;
  std::unique_ptr<Backend> backend_;
  StoreEvents* events_;

  mutable std::shared_mutex table_mu_;
  std::unordered_map<std::string, std::shared_ptr<Session>> sessions_;
  std::atomic<int64_t> num_sessions_{0};

  std::atomic<int64_t> tokens_{0}, codes_{0}, scales_{0}, full_precision_{0}, metadata_{0}, fp16_equiv_{0};
};

}  // namespace kvq::store
