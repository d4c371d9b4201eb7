#include "kvstore/backend.h"

#include "kvstore/cpu_backend.h"

namespace kvq::store {

#if defined(KVQ_STORE_HAVE_CUDA)
// Defined by the CUDA backend (cuda_backend.*) when it is built: NOT_FOUND when no device.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int64_t pool_bytes);
#endif

bool ParseBackendKind(const std::string& text, BackendKind* out) {
  if (text == "auto") *out = BackendKind::kAuto;
  else if (text == "cpu") *out = BackendKind::kCpu;
  else if (text == "cuda") *out = BackendKind::kCuda;
  else return false;
  return true;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(BackendKind kind, int64_t pool_bytes, int threads) {
#if defined(KVQ_STORE_HAVE_CUDA)
  if (kind == BackendKind::kCuda || kind == BackendKind::kAuto) {
    auto cuda = MakeCudaBackend(pool_bytes);
    if (cuda.ok() || kind == BackendKind::kCuda) return cuda;
  }
#else
  if (kind == BackendKind::kCuda)
    return absl::FailedPreconditionError("this kvq-store was built without the CUDA backend");
#endif
  auto cpu = CpuBackend::Create(pool_bytes, threads);
  if (!cpu.ok()) return cpu.status();
  return std::unique_ptr<Backend>(std::move(cpu).value());
}

}  // namespace kvq::store
