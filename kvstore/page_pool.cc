#include "kvstore/page_pool.h"

#include <algorithm>
#include <utility>

namespace kvq::store {
namespace {
int64_t RoundUp(int64_t x) { return (x + PagePool::kAlign - 1) / PagePool::kAlign * PagePool::kAlign; }
}  // namespace

PagePool::PagePool(int64_t capacity_bytes) : capacity_(std::max<int64_t>(0, capacity_bytes) / kAlign * kAlign) {}

bool PagePool::Allocate(int64_t bytes, int64_t* offset) {
  if (bytes <= 0 || offset == nullptr) return false;
  const int64_t size = RoundUp(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = free_lists_.find(size);
  if (it != free_lists_.end() && !it->second.empty()) {
    *offset = it->second.back();
    it->second.pop_back();
    used_.fetch_add(size, std::memory_order_relaxed);
    return true;
  }
  if (capacity_ - top_ < size && !(ReclaimTopLocked() && capacity_ - top_ >= size)) return false;
  *offset = top_;
  top_ += size;
  used_.fetch_add(size, std::memory_order_relaxed);
  return true;
}

void PagePool::Free(int64_t offset, int64_t bytes) {
  const int64_t size = RoundUp(bytes);
  if (bytes <= 0 || offset < 0 || offset % kAlign != 0 || offset + size > capacity_) {
    bad_frees_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (offset + size > top_) {
    bad_frees_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (offset + size == top_) {
    top_ = offset;  // the most recent page goes straight back to the bump region
  } else {
    free_lists_[size].push_back(offset);
  }
  used_.fetch_sub(size, std::memory_order_relaxed);
}

bool PagePool::ReclaimTopLocked() {
  std::vector<std::pair<int64_t, int64_t>> pages;  // (offset, size)
  for (auto& [size, offsets] : free_lists_)
    for (int64_t off : offsets) pages.emplace_back(off, size);
  if (pages.empty()) return false;
  std::sort(pages.begin(), pages.end());
  const int64_t old_top = top_;
  while (!pages.empty() && pages.back().first + pages.back().second == top_) {
    top_ = pages.back().first;
    pages.pop_back();
  }
  if (top_ == old_top) return false;
  free_lists_.clear();
  for (auto& [off, size] : pages) free_lists_[size].push_back(off);
  return true;
}

}  // namespace kvq::store
