// The CUDA backend: the arena is one cudaMalloc of --pool_bytes made at start-up; a batched step is
// one quantize-append launch and one attention launch (split-KV + merge) for the whole batch,
// through kvq::CudaStepRunner. q/k/v come in host memory and go to the device through pinned
// staging buffers on the backend's stream; CUDA errors become statuses (out of memory ->
// RESOURCE_EXHAUSTED), never aborts.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "kvq/cuda_ops.h"
#include "kvstore/backend.h"
#include "kvstore/page_pool.h"

namespace kvq::store {

class CudaBackend final : public Backend {
 public:
  // NOT_FOUND without a CUDA device; RESOURCE_EXHAUSTED when the device cannot hold the pool.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int64_t pool_bytes);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  kvq::PageAllocator& allocator() override { return pool_; }
  int64_t pool_capacity() const override { return pool_.capacity(); }
  int64_t pool_used() const override { return pool_.used(); }
  // Steps are serialized on the backend's stream (one launch per layer-batch already covers the
  // whole batch); concurrent callers wait for the mutex.
  absl::Status RunStep(const kvq::StepParams& params, const kvq::SeqWork* works,
                       const kvq::QuantConfig* configs, int num_seqs) override;

  // For tests: the device arena.
  uint8_t* device_arena() { return arena_; }

 private:
  CudaBackend(uint8_t* arena, int64_t bytes) : arena_(arena), pool_(bytes) {}
  absl::Status Grow(int64_t q_bytes, int64_t kv_bytes);

  uint8_t* arena_ = nullptr;
  PagePool pool_;
  std::mutex mu_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<kvq::CudaStepRunner> runner_;
  // Device inputs/outputs and their pinned host staging, grown on demand.
  int64_t q_cap_ = 0, kv_cap_ = 0;
  uint8_t *d_q_ = nullptr, *d_k_ = nullptr, *d_v_ = nullptr, *d_o_ = nullptr;
  uint8_t *h_q_ = nullptr, *h_k_ = nullptr, *h_v_ = nullptr, *h_o_ = nullptr;
};

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int64_t pool_bytes);

}  // namespace kvq::store
