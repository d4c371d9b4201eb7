// The store's compute backend: owns the arena (one allocation of the pool size, made at start-up)
// and the page pool over it, and runs batched steps. The CPU backend (cpu_backend.h) is the
// reference; a CUDA backend implements the same interface with the arena in device memory.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvq/cache.h"

namespace kvq::store {

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;

  // The page allocator over this backend's arena. Thread-safe.
  virtual kvq::PageAllocator& allocator() = 0;
  virtual int64_t pool_capacity() const = 0;
  virtual int64_t pool_used() const = 0;

  // Runs one batched step of one layer (flush, append, attention; see kvq::SeqWork) for
  // `num_seqs` sequences that share params' shape and dtype. params.q/k_new/v_new/o are HOST
  // buffers ([rows, H, D] activation dtype); a device backend copies them. configs[i] belongs to
  // works[i]. May be called concurrently for disjoint sessions. Errors come back as a status,
  // never as an abort; on error the caller aborts the plans (the arena pages they wrote are
  // pages the plans own).
  // flush_after: null, or num_seqs flush-only works (n_new = 0, kvq::LayerCache::PlanFlushAfter)
  // on the states after this step, run after its attention: the next steps' flushes, in the
  // spec's order (attention, then quantization); a device backend runs them beside the attention,
  // or not at all where they would not run beside it (*flushed = false: the caller then drops
  // them and the next steps flush as usual). Both are done when RunStep returns; a failure of either
  // fails the call (the caller aborts the step's plans and the flushes').
  virtual absl::Status RunStep(const kvq::StepParams& params, const kvq::SeqWork* works,
                               const kvq::QuantConfig* configs, int num_seqs,
                               const kvq::SeqWork* flush_after = nullptr, bool* flushed = nullptr) = 0;
};

enum class BackendKind { kAuto, kCpu, kCuda };

// Parses "auto", "cpu", "cuda".
bool ParseBackendKind(const std::string& text, BackendKind* out);

// Knobs of the backends that MakeBackend builds (each backend reads its own).
constexpr int kMaxCudaLanes = 8;
struct BackendOptions {
  int threads = 0;     // CPU backend: threads per step (0 = all cores)
  int cuda_lanes = 2;  // CUDA backend: steps that may run at once, each on its own stream (1..kMaxCudaLanes)
};

// Makes a backend with an arena of `pool_bytes`. kAuto picks CUDA when it is built and a device is
// present, else CPU. INVALID_ARGUMENT for cuda_lanes outside 1..kMaxCudaLanes unless kind is kCpu.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(BackendKind kind, int64_t pool_bytes,
                                                     const BackendOptions& options);
// The same with default options but `threads` (the CPU backend's threads, 0 = all cores).
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(BackendKind kind, int64_t pool_bytes, int threads);

}  // namespace kvq::store
