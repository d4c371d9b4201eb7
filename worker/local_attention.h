// In-process attention backend on the kernels' CPU reference: each session's cache is a set of
// kvq::LayerCache objects over pages of one host arena, stepped with kvq::CpuRunStep: the same
// quantized formats as the store, without a server (tests, reference checks, offline runs).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvq/cache.h"
#include "worker/attention.h"

namespace kvq::worker {

// Fixed-capacity host arena with per-size free lists (pages of a few sizes are reused).
class HostPagePool : public kvq::PageAllocator {
 public:
  explicit HostPagePool(int64_t capacity_bytes);
  bool Allocate(int64_t bytes, int64_t* offset) override;
  void Free(int64_t offset, int64_t bytes) override;
  uint8_t* base() { return arena_.data(); }
  int64_t used() const { return used_; }

 private:
  std::vector<uint8_t> arena_;
  int64_t top_ = 0, used_ = 0;
  std::map<int64_t, std::vector<int64_t>> free_;
};

class LocalAttention : public AttentionBackend {
 public:
  explicit LocalAttention(int64_t arena_bytes, int threads = 0);
  ~LocalAttention() override;
  absl::StatusOr<std::string> CreateSession(const SessionShape& shape, const std::string& preset) override;
  absl::Status DeleteSession(const std::string& session) override;
  absl::StatusOr<int32_t> SessionLength(const std::string& session) override;
  absl::Status Attend(int layer, const std::vector<AttendSeq>& seqs, const std::vector<float>& q,
                      const std::vector<float>& k, const std::vector<float>& v, std::vector<float>* o) override;
  // Bytes the session's cache holds (all layers) and the fp16-equivalent of its tokens.
  absl::StatusOr<std::pair<int64_t, int64_t>> SessionBytes(const std::string& session) const;

 private:
  struct Session {
    SessionShape shape;
    kvq::QuantConfig config;
    std::vector<kvq::LayerCache> layers;
  };
  HostPagePool pool_;
  int threads_;
  std::map<std::string, std::unique_ptr<Session>> sessions_;
  int next_id_ = 1;
};

}  // namespace kvq::worker
