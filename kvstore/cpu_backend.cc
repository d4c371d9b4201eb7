#include "kvstore/cpu_backend.h"

#include <new>

#include "kvq/reference.h"
#include "kvstore/status.h"

namespace kvq::store {

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::Create(int64_t pool_bytes, int threads) {
  if (pool_bytes < PagePool::kAlign)
    return absl::InvalidArgumentError("pool_bytes must be at least 16, got " + std::to_string(pool_bytes));
  // Not value-initialized: the OS commits pages only as the pool hands them out.
  std::unique_ptr<uint8_t[]> arena(new (std::nothrow) uint8_t[static_cast<size_t>(pool_bytes)]);
  if (!arena)
    return absl::ResourceExhaustedError("cannot allocate a host arena of " + std::to_string(pool_bytes) + " bytes");
  return std::unique_ptr<CpuBackend>(new CpuBackend(std::move(arena), pool_bytes, threads < 0 ? 0 : threads));
}

absl::Status CpuBackend::RunStep(const kvq::StepParams& params, const kvq::SeqWork* works,
                                 const kvq::QuantConfig* configs, int num_seqs, const kvq::SeqWork* flush_after,
                                 bool* flushed) {
  if (flushed) *flushed = false;
  if (num_seqs <= 0) return absl::OkStatus();
  KVQ_RETURN_IF_ERROR(FromResult(kvq::CpuRunStep(params, works, configs, num_seqs, arena_.get(), threads_)));
  if (!flush_after) return absl::OkStatus();
  KVQ_RETURN_IF_ERROR(
      FromResult(kvq::CpuQuantizeAppend(params, flush_after, configs, num_seqs, arena_.get(), threads_)));
  if (flushed) *flushed = true;
  return absl::OkStatus();
}

}  // namespace kvq::store
