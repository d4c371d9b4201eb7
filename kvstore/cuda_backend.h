// The CUDA backend: the arena is one cudaMalloc of --pool_bytes made at start-up; a batched step is
// one quantize-append launch and one attention launch (split-KV + merge) for the whole batch,
// through kvq::CudaStepRunner. q/k/v come in host memory and go to the device inside the runner's
// pinned descriptor upload (one copy); o and the kernels' error flag come back in one copy. CUDA
// errors become statuses (out of memory -> RESOURCE_EXHAUSTED), never aborts.
//
// Concurrency: the backend owns N lanes (--cuda_lanes). A lane is a non-blocking stream and its own
// CudaStepRunner (with its own pinned staging and device buffers). RunStep takes a free lane
// (waiting while all are busy) and runs the whole step on it without holding the backend's mutex,
// so steps for disjoint sessions overlap: one step's host->device copies and host-side staging run
// beside another step's kernels. The arena and the page pool are shared by all lanes (disjoint
// sessions touch disjoint pages; the pool is thread-safe).
#pragma once

#include <cuda_runtime_api.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvq/cuda_ops.h"
#include "kvstore/backend.h"
#include "kvstore/page_pool.h"

namespace kvq::store {

class CudaBackend final : public Backend {
 public:
  static constexpr int kMaxLanes = kMaxCudaLanes;
  static constexpr int kDefaultLanes = BackendOptions{}.cuda_lanes;

  // NOT_FOUND without a CUDA device; RESOURCE_EXHAUSTED when the device cannot hold the pool;
  // INVALID_ARGUMENT when `lanes` is outside 1..kMaxLanes.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int64_t pool_bytes, int lanes = kDefaultLanes);
  // Waits for steps in flight, synchronizes every lane's stream, then frees.
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  kvq::PageAllocator& allocator() override { return pool_; }
  int64_t pool_capacity() const override { return pool_.capacity(); }
  int64_t pool_used() const override { return pool_.used(); }
  // Runs the step on a free lane (waits while every lane is busy). Thread-safe; concurrent calls
  // must be for disjoint sessions (Backend's contract).
  // flush_after: launched right after the attention as its programmatic dependent, in the same
  // runner call (kvq::CudaStepRunner::RunStep); o comes back after it. Not where the plan fuses the
  // step or nothing is flushed (*flushed = false).
  absl::Status RunStep(const kvq::StepParams& params, const kvq::SeqWork* works,
                       const kvq::QuantConfig* configs, int num_seqs,
                       const kvq::SeqWork* flush_after = nullptr, bool* flushed = nullptr) override;

  // For tests and metrics.
  int num_lanes() const { return static_cast<int>(lanes_.size()); }
  int busy_lanes() const;
  // The most lanes that were busy at the same time since creation (or the last reset): >= 2 proves
  // that steps really ran concurrently.
  int max_busy_lanes() const;
  void ResetMaxBusyLanes();
  // For tests: the device arena.
  uint8_t* device_arena() { return arena_; }

 private:
  struct Lane;
  class LaneLease;

  CudaBackend(uint8_t* arena, int64_t bytes);
  Lane* AcquireLane();
  void ReleaseLane(Lane* lane);

  uint8_t* arena_ = nullptr;
  PagePool pool_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  // Guards free_, busy_, max_busy_ (never held while a step runs).
  mutable std::mutex mu_;
  std::condition_variable lane_freed_;
  std::vector<Lane*> free_;
  int busy_ = 0, max_busy_ = 0;
};

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int64_t pool_bytes, int lanes);

}  // namespace kvq::store
