#include "kvstore/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

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

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int64_t pool_bytes) {
  if (pool_bytes < PagePool::kAlign)
    return absl::InvalidArgumentError("pool_bytes must be at least 16, got " + std::to_string(pool_bytes));
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
  KVQ_CUDA_STATUS(cudaStreamCreateWithFlags(&b->stream_, cudaStreamNonBlocking));
  KVQ_RETURN_IF_ERROR(FromResult(kvq::CudaStepRunner::Create(&b->runner_)));
  return b;
}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  runner_.reset();
  for (uint8_t* p : {d_q_, d_k_, d_v_, d_o_}) cudaFree(p);
  for (uint8_t* p : {h_q_, h_k_, h_v_, h_o_}) cudaFreeHost(p);
  cudaFree(arena_);
  if (stream_) cudaStreamDestroy(stream_);
}

absl::Status CudaBackend::Grow(int64_t q_bytes, int64_t kv_bytes) {
  if (q_bytes > q_cap_) {
    const int64_t cap = std::max(q_bytes, q_cap_ * 2);
    for (uint8_t** p : {&d_q_, &d_o_}) { cudaFree(*p); *p = nullptr; }
    for (uint8_t** p : {&h_q_, &h_o_}) { cudaFreeHost(*p); *p = nullptr; }
    q_cap_ = 0;
    KVQ_CUDA_STATUS(cudaMalloc(&d_q_, cap));
    KVQ_CUDA_STATUS(cudaMalloc(&d_o_, cap));
    KVQ_CUDA_STATUS(cudaMallocHost(&h_q_, cap));
    KVQ_CUDA_STATUS(cudaMallocHost(&h_o_, cap));
    q_cap_ = cap;
  }
  if (kv_bytes > kv_cap_) {
    const int64_t cap = std::max(kv_bytes, kv_cap_ * 2);
    for (uint8_t** p : {&d_k_, &d_v_}) { cudaFree(*p); *p = nullptr; }
    for (uint8_t** p : {&h_k_, &h_v_}) { cudaFreeHost(*p); *p = nullptr; }
    kv_cap_ = 0;
    KVQ_CUDA_STATUS(cudaMalloc(&d_k_, cap));
    KVQ_CUDA_STATUS(cudaMalloc(&d_v_, cap));
    KVQ_CUDA_STATUS(cudaMallocHost(&h_k_, cap));
    KVQ_CUDA_STATUS(cudaMallocHost(&h_v_, cap));
    kv_cap_ = cap;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::RunStep(const kvq::StepParams& params, const kvq::SeqWork* works,
                                  const kvq::QuantConfig* configs, int num_seqs) {
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
  std::lock_guard<std::mutex> lock(mu_);
  KVQ_RETURN_IF_ERROR(Grow(std::max<int64_t>(q_bytes, 16), std::max<int64_t>(kv_bytes, 16)));
  // The staging buffers are free: the previous step ended with a synchronize.
  std::memcpy(h_q_, params.q, q_bytes);
  std::memcpy(h_k_, params.k_new, kv_bytes);
  std::memcpy(h_v_, params.v_new, kv_bytes);
  KVQ_CUDA_STATUS(cudaMemcpyAsync(d_q_, h_q_, q_bytes, cudaMemcpyHostToDevice, stream_));
  KVQ_CUDA_STATUS(cudaMemcpyAsync(d_k_, h_k_, kv_bytes, cudaMemcpyHostToDevice, stream_));
  KVQ_CUDA_STATUS(cudaMemcpyAsync(d_v_, h_v_, kv_bytes, cudaMemcpyHostToDevice, stream_));
  kvq::StepParams p = params;
  p.q = d_q_;
  p.k_new = d_k_;
  p.v_new = d_v_;
  p.o = d_o_;
  kvq::Result r = runner_->RunStep(p, works, configs, num_seqs, arena_, stream_);
  if (!r.ok()) {
    (void)runner_->Synchronize(stream_);  // drain what was queued before reporting
    return FromResult(r);
  }
  KVQ_CUDA_STATUS(cudaMemcpyAsync(h_o_, d_o_, q_bytes, cudaMemcpyDeviceToHost, stream_));
  KVQ_RETURN_IF_ERROR(FromResult(runner_->Synchronize(stream_)));
  std::memcpy(params.o, h_o_, q_bytes);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int64_t pool_bytes) {
  auto b = CudaBackend::Create(pool_bytes);
  if (!b.ok()) return b.status();
  return std::unique_ptr<Backend>(std::move(b).value());
}

}  // namespace kvq::store
