#include "kvstore/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "kvstore/status.h"

namespace kvq::store {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  (void)cudaGetLastError();
  const std::string msg = std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

#define KVQ_CUDA_STATUS(expr)                                          \
  do {                                                                 \
    const cudaError_t kvq_e_ = (expr);                                 \
    if (kvq_e_ != cudaSuccess) return CudaStatus(kvq_e_, #expr);       \
  } while (0)

}  // namespace

// One lane: a stream and a runner (which owns the step's pinned staging and device buffers). Only
// the thread that holds the lane (LaneLease) touches it.
struct CudaBackend::Lane {
  cudaStream_t stream = nullptr;
  std::unique_ptr<kvq::CudaStepRunner> runner;

  ~Lane() {
    if (stream) cudaStreamSynchronize(stream);
    runner.reset();
    if (stream) cudaStreamDestroy(stream);
    (void)cudaGetLastError();
  }

  // After a failed step: waits for what was queued (the staging buffers and the pages the step
  // wrote are free again once this returns), clears the runner's kernel error flag and the
  // thread's CUDA error, so the lane serves the next step.
  void Drain() {
    if (runner) (void)runner->Synchronize(stream);
    (void)cudaStreamSynchronize(stream);
    (void)cudaGetLastError();
  }
};

// Holds a lane for one step; gives it back on every path, drained unless the step finished
// cleanly (Done).
class CudaBackend::LaneLease {
 public:
  explicit LaneLease(CudaBackend* b) : b_(b), lane_(b->AcquireLane()) {}
  ~LaneLease() {
    if (!clean_) lane_->Drain();
    b_->ReleaseLane(lane_);
  }
  LaneLease(const LaneLease&) = delete;
  LaneLease& operator=(const LaneLease&) = delete;
  Lane& operator*() const { return *lane_; }
  void Done() { clean_ = true; }

 private:
  CudaBackend* b_;
  Lane* lane_;
  bool clean_ = false;
};

CudaBackend::CudaBackend(uint8_t* arena, int64_t bytes) : arena_(arena), pool_(bytes) {}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int64_t pool_bytes, int lanes) {
  if (pool_bytes < PagePool::kAlign)
    return absl::InvalidArgumentError("pool_bytes must be at least 16, got " + std::to_string(pool_bytes));
  if (lanes < 1 || lanes > kMaxLanes)
    return absl::InvalidArgumentError("lanes must be in 1.." + std::to_string(kMaxLanes) + ", got " +
                                      std::to_string(lanes));
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    return absl::NotFoundError("no CUDA device");
  }
  uint8_t* arena = nullptr;
  const cudaError_t e = cudaMalloc(&arena, static_cast<size_t>(pool_bytes));
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::ResourceExhaustedError("cannot allocate a device arena of " + std::to_string(pool_bytes) +
                                        " bytes: " + cudaGetErrorString(e));
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend(arena, pool_bytes));
  for (int i = 0; i < lanes; ++i) {
    b->lanes_.push_back(std::make_unique<Lane>());
    Lane& lane = *b->lanes_.back();
    KVQ_CUDA_STATUS(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking));
    KVQ_RETURN_IF_ERROR(FromResult(kvq::CudaStepRunner::Create(&lane.runner)));
  }
  // Lane 0 on top of the free list: a lone caller always gets the same lane (warm buffers).
  for (int i = lanes - 1; i >= 0; --i) b->free_.push_back(b->lanes_[i].get());
  return b;
}

CudaBackend::~CudaBackend() {
  {
    // A caller still inside RunStep holds a lane; wait for it rather than free under it.
    std::unique_lock<std::mutex> lock(mu_);
    lane_freed_.wait(lock, [&] { return busy_ == 0; });
  }
  for (auto& lane : lanes_)
    if (lane->stream) cudaStreamSynchronize(lane->stream);
  lanes_.clear();
  cudaFree(arena_);
  (void)cudaGetLastError();
}

CudaBackend::Lane* CudaBackend::AcquireLane() {
  std::unique_lock<std::mutex> lock(mu_);
  lane_freed_.wait(lock, [&] { return !free_.empty(); });
  Lane* lane = free_.back();
  free_.pop_back();
  max_busy_ = std::max(max_busy_, ++busy_);
  return lane;
}

void CudaBackend::ReleaseLane(Lane* lane) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(lane);
  --busy_;
  // notify_all: both a waiting RunStep and the destructor (busy_ == 0) may wait on it. Under the
  // lock, so that the destructor cannot wake, finish and destroy the condition variable first.
  lane_freed_.notify_all();
}

int CudaBackend::busy_lanes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return busy_;
}

int CudaBackend::max_busy_lanes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return max_busy_;
}

void CudaBackend::ResetMaxBusyLanes() {
  std::lock_guard<std::mutex> lock(mu_);
  max_busy_ = busy_;
}

absl::Status CudaBackend::RunStep(const kvq::StepParams& params, const kvq::SeqWork* works,
                                  const kvq::QuantConfig* configs, int num_seqs, const kvq::SeqWork* flush_after,
                                  bool* flushed) {
  if (flushed) *flushed = false;
  if (num_seqs <= 0) return absl::OkStatus();
  if (!params.q || !params.k_new || !params.v_new || !params.o)
    return absl::InvalidArgumentError("null q, k_new, v_new or o");
  const std::string sup = kvq::CudaSupports(params, configs, num_seqs);
  if (!sup.empty()) return absl::InvalidArgumentError(sup);
  int64_t q_rows = 0, kv_rows = 0;
  for (int i = 0; i < num_seqs; ++i) {
    if (works[i].q_row < 0 || works[i].kv_row < 0 || works[i].n_new < 0)
      return absl::InvalidArgumentError("negative row or n_new");
    q_rows = std::max(q_rows, works[i].q_row + works[i].n_new);
    kv_rows = std::max(kv_rows, works[i].kv_row + works[i].n_new);
  }
  const int64_t q_bytes = q_rows * params.num_q_heads * params.head_dim * 2;
  const int64_t kv_bytes = kv_rows * params.num_kv_heads * params.head_dim * 2;
  // From here on the step owns one lane and nothing else: no backend lock is held while it
  // copies, launches and waits, so other lanes' steps run beside it.
  LaneLease lease(this);
  Lane& lane = *lease;
  // q, k and v go up inside the runner's descriptor upload, and the kernels write o and the error
  // flag into the runner's mapped pinned buffer: one copy per step (the step is a chain of small
  // transfers and launches on one stream, each with its own latency; outputs over the runner's
  // mapped bound come back in a second copy). On any error return the lease drains what was queued
  // before the lane goes back.
  KVQ_RETURN_IF_ERROR(FromResult(lane.runner->RunStepFromHost(params, q_bytes, kv_bytes, works, configs, num_seqs,
                                                              arena_, lane.stream, flush_after)));
  if (flushed) *flushed = flush_after != nullptr && lane.runner->stats().flush_after;
  lease.Done();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int64_t pool_bytes, int lanes) {
  auto b = CudaBackend::Create(pool_bytes, lanes);
  if (!b.ok()) return b.status();
  return std::unique_ptr<Backend>(std::move(b).value());
}

}  // namespace kvq::store
