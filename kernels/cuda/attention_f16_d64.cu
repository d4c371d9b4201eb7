// One instantiation of the attention kernel family per file keeps nvcc builds parallel.
#include "attention.cuh"

namespace kvq {
namespace cuda {

cudaError_t LaunchAttentionF16D64(const AttnArgs& args, int num_units, cudaStream_t stream) {
  return LaunchAttentionT<64, DType::kF16>(args, num_units, stream);
}

int AttentionBlocksPerSmF16D64() { return AttentionBlocksPerSmT<64, DType::kF16>(); }

}  // namespace cuda
}  // namespace kvq
