#include "kvstore/backend.h"

#include <string>

#include "kvstore/cpu_backend.h"

namespace kvq::store {

#if defined(KVQ_STORE_HAVE_CUDA)
// Defined by the CUDA backend (cuda_backend.*) when it is built: NOT_FOUND when no device.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int64_t pool_bytes, int lanes);
#endif

bool ParseBackendKind(const std::string& text, BackendKind* out) {
  if (text == "auto") *out = BackendKind::kAuto;
  else if (text == "cpu") *out = BackendKind::kCpu;
  else if (text == "cuda") *out = BackendKind::kCuda;
  else return false;
  return true;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(BackendKind kind, int64_t pool_bytes,
                                                     const BackendOptions& options) {
  if (kind != BackendKind::kCpu && (options.cuda_lanes < 1 || options.cuda_lanes > kMaxCudaLanes))
    return absl::InvalidArgumentError("cuda_lanes must be in 1.." + std::to_string(kMaxCudaLanes) + ", got " +
                                      std::to_string(options.cuda_lanes));
#if defined(KVQ_STORE_HAVE_CUDA)
  if (kind == BackendKind::kCuda || kind == BackendKind::kAuto) {
    auto cuda = MakeCudaBackend(pool_bytes, options.cuda_lanes);
    if (cuda.ok() || kind == BackendKind::kCuda) return cuda;
  }
#else
  if (kind == BackendKind::kCuda)
    return absl::FailedPreconditionError("this kvq-store was built without the CUDA backend");
#endif
  auto cpu = CpuBackend::Create(pool_bytes, options.threads);
  if (!cpu.ok()) return cpu.status();
  return std::unique_ptr<Backend>(std::move(cpu).value());
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(BackendKind kind, int64_t pool_bytes, int threads) {
  BackendOptions options;
  options.threads = threads;
  return MakeBackend(kind, pool_bytes, options);
}

}  // namespace kvq::store
