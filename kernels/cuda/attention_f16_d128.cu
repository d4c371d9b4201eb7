// One instantiation of the attention kernel family per file keeps nvcc builds parallel.
#include "attention.cuh"

namespace kvq {
namespace cuda {

cudaError_t LaunchAttentionF16D128(const AttnArgs& args, int num_units, cudaStream_t stream) {
  return LaunchAttentionT<128, DType::kF16>(args, num_units, stream);
}

int AttentionBlocksPerSmF16D128() { return AttentionBlocksPerSmT<128, DType::kF16>(); }

}  // namespace cuda
}  // namespace kvq
