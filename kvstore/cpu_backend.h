// The CPU backend: the arena is one host allocation; steps run kvq::CpuRunStep.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvstore/backend.h"
#include "kvstore/page_pool.h"

namespace kvq::store {

class CpuBackend final : public Backend {
 public:
  // Fails (RESOURCE_EXHAUSTED) when the host cannot give `pool_bytes`.
  static absl::StatusOr<std::unique_ptr<CpuBackend>> Create(int64_t pool_bytes, int threads);

  std::string name() const override { return "cpu"; }
  kvq::PageAllocator& allocator() override { return pool_; }
  int64_t pool_capacity() const override { return pool_.capacity(); }
  int64_t pool_used() const override { return pool_.used(); }
  absl::Status RunStep(const kvq::StepParams& params, const kvq::SeqWork* works,
                       const kvq::QuantConfig* configs, int num_seqs,
                       const kvq::SeqWork* flush_after = nullptr, bool* flushed = nullptr) override;

  // For tests: the arena and the pool.
  uint8_t* arena() { return arena_.get(); }
  const PagePool& pool() const { return pool_; }

 private:
  CpuBackend(std::unique_ptr<uint8_t[]> arena, int64_t bytes, int threads)
      : arena_(std::move(arena)), pool_(bytes), threads_(threads) {}

  std::unique_ptr<uint8_t[]> arena_;
  PagePool pool_;
  int threads_;
};

}  // namespace kvq::store
