#include "kvq/host_arena.h"

#include <cstring>
#include <string>

#include "kvq/format.h"

namespace kvq {

HostArena::HostArena(int64_t capacity_bytes)
    : capacity_(capacity_bytes < 0 ? 0 : AlignUp16(capacity_bytes)),
      data_(new uint8_t[size_t(capacity_ < 16 ? 16 : capacity_)]) {
  std::memset(data_.get(), kFillByte, size_t(capacity_ < 16 ? 16 : capacity_));
}

bool HostArena::Allocate(int64_t bytes, int64_t* offset) {
  if (bytes <= 0) return false;
  const int64_t size = AlignUp16(bytes);
  const int64_t slot = size + kGuardBytes;
  std::lock_guard<std::mutex> lock(mu_);
  int64_t off = -1;
  auto it = free_.find(size);
  if (it != free_.end() && !it->second.empty()) {
    off = it->second.back();
    it->second.pop_back();
  } else {
    if (slot > capacity_ - bump_) return false;
    off = bump_;
    bump_ += slot;
  }
  std::memset(data_.get() + off, kFillByte, size_t(size));
  std::memset(data_.get() + off + size, kGuardByte, size_t(kGuardBytes));
  live_[off] = size;
  *offset = off;
  return true;
}

void HostArena::Free(int64_t offset, int64_t bytes) {
  const int64_t size = AlignUp16(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(offset);
  if (it == live_.end()) {
    if (error_.empty()) error_ = "free of an offset that is not allocated: " + std::to_string(offset);
    return;
  }
  if (it->second != size) {
    if (error_.empty())
      error_ = "free of offset " + std::to_string(offset) + " with size " + std::to_string(bytes) +
               ", allocated with " + std::to_string(it->second);
    return;
  }
  const uint8_t* g = data_.get() + offset + size;
  for (int64_t i = 0; i < kGuardBytes; ++i) {
    if (g[i] != kGuardByte && error_.empty())
      error_ = "guard band after offset " + std::to_string(offset) + " overwritten (found at free)";
  }
  live_.erase(it);
  free_[size].push_back(offset);
}

int64_t HostArena::live_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (const auto& kv : live_) n += kv.second;
  return n;
}

int64_t HostArena::live_allocations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return int64_t(live_.size());
}

std::string HostArena::Check() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!error_.empty()) return error_;
  for (const auto& kv : live_) {
    const uint8_t* g = data_.get() + kv.first + kv.second;
    for (int64_t i = 0; i < kGuardBytes; ++i)
      if (g[i] != kGuardByte)
        return "guard band after offset " + std::to_string(kv.first) + " (" + std::to_string(kv.second) +
               " bytes) overwritten";
  }
  return "";
}

}  // namespace kvq
