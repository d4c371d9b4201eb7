// The store's page pool: one fixed byte range (the backend's arena, host or device memory) handed
// out as fixed-size pages by offset. Page sizes depend on the model shape and config, so there is a
// free list per page size plus a bump pointer; a freed page is reused by the next page of the same
// size, and free pages at the top of the range are returned to the bump region when an allocation
// would otherwise fail. Thread-safe. Holds no memory itself: offsets only.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kvq/cache.h"

namespace kvq::store {

class PagePool final : public kvq::PageAllocator {
 public:
  static constexpr int64_t kAlign = 16;

  explicit PagePool(int64_t capacity_bytes);

  // Page sizes are rounded up to kAlign; offsets are kAlign-aligned.
  bool Allocate(int64_t bytes, int64_t* offset) override;
  void Free(int64_t offset, int64_t bytes) override;

  int64_t capacity() const { return capacity_; }
  int64_t used() const { return used_.load(std::memory_order_relaxed); }
  int64_t free() const { return capacity_ - used(); }
  // Frees that did not match a plausible page (out of range or misaligned): must stay 0.
  int64_t bad_frees() const { return bad_frees_.load(std::memory_order_relaxed); }

 private:
  // Moves free pages that end at top_ back into the bump region. Needs mu_.
  bool ReclaimTopLocked();

  const int64_t capacity_;
  std::mutex mu_;
  int64_t top_ = 0;  // bump pointer: [top_, capacity_) was never handed out or was reclaimed
  std::unordered_map<int64_t, std::vector<int64_t>> free_lists_;  // page bytes -> offsets
  std::atomic<int64_t> used_{0};
  std::atomic<int64_t> bad_frees_{0};
};

}  // namespace kvq::store
