// A host-memory PageAllocator: one buffer allocated up front, a bump pointer plus exact-size free
// lists (the cache allocates only a few distinct page sizes). Every allocation is followed by a
// 16-byte guard band; CheckGuards() reports any band that was overwritten (an out-of-bounds
// write by a kernel). Fresh memory is filled with a non-zero pattern so reads of unwritten bytes
// show up as wrong values, not as plausible zeros. Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kvq/cache.h"

namespace kvq {

class HostArena : public PageAllocator {
 public:
  static constexpr int64_t kGuardBytes = 16;
  static constexpr uint8_t kGuardByte = 0xA5;
  static constexpr uint8_t kFillByte = 0xCD;

  explicit HostArena(int64_t capacity_bytes);
  ~HostArena() override = default;
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  bool Allocate(int64_t bytes, int64_t* offset) override;
  void Free(int64_t offset, int64_t bytes) override;

  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  int64_t capacity() const { return capacity_; }
  // Bytes of live allocations as requested (rounded up to 16), guard bands not included.
  int64_t live_bytes() const;
  int64_t live_allocations() const;
  // "" when every live allocation's guard band is intact and no Free was bad; else a message
  // naming the first problem (overwritten guard, double free, free of an unknown offset or with
  // the wrong size).
  std::string Check() const;

 private:
  int64_t capacity_;
  std::unique_ptr<uint8_t[]> data_;
  mutable std::mutex mu_;
  int64_t bump_ = 0;
  std::map<int64_t, std::vector<int64_t>> free_;  // slot size -> offsets
  std::map<int64_t, int64_t> live_;               // offset -> requested size (rounded)
  std::string error_;
};

}  // namespace kvq
