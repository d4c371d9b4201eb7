// One (dtype, head_dim) of the decode fast path (rows classes 1, 4, 8) per file: parallel nvcc builds.
#include "decode.cuh"

namespace kvq {
namespace cuda {

KVQ_DECODE_INSTANTIATE(BF16D128, 128, DType::kBF16)

}  // namespace cuda
}  // namespace kvq
