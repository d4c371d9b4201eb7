// Merge of split-KV partial states for the generic kernel: for each (sequence, KV head, row block)
// combine the units' unnormalized (o, m, l) into the final output (MergeItemRows). The decode
// path merges inside its own launch (the last unit of an item to finish, decode.cuh).
#include "device_common.cuh"

namespace kvq {
namespace cuda {
namespace {

template <int D, DType DT>
__global__ void __launch_bounds__(128) MergeKernel(MergeArgs a) {
  const DevMergeItem it = a.items[blockIdx.x];
  MergeItemRows<D, DT>(it, a.seqs[it.seq], a.part_o, a.part_ml, a.o, a.num_q_heads, a.group, threadIdx.x, blockDim.x);
}

template <int D, DType DT>
cudaError_t Launch(const MergeArgs& args, int num_items, cudaStream_t stream) {
  if (num_items <= 0) return cudaSuccess;
  return LaunchKernel(MergeKernel<D, DT>, dim3(num_items), dim3(128), 0, stream, args, false);
}

}  // namespace

cudaError_t LaunchMerge(const MergeArgs& args, int head_dim, DType dtype, int num_items,
                        cudaStream_t stream) {
  if (dtype == DType::kF16) {
    if (head_dim == 64) return Launch<64, DType::kF16>(args, num_items, stream);
    if (head_dim == 128) return Launch<128, DType::kF16>(args, num_items, stream);
  } else if (dtype == DType::kBF16) {
    if (head_dim == 64) return Launch<64, DType::kBF16>(args, num_items, stream);
    if (head_dim == 128) return Launch<128, DType::kBF16>(args, num_items, stream);
  }
  return cudaErrorInvalidValue;
}

int AttentionBlocksPerSm(int head_dim, DType dtype) {
  if (dtype == DType::kF16) return head_dim == 64 ? AttentionBlocksPerSmF16D64() : AttentionBlocksPerSmF16D128();
  return head_dim == 64 ? AttentionBlocksPerSmBF16D64() : AttentionBlocksPerSmBF16D128();
}

cudaError_t LaunchAttention(const AttnArgs& args, int head_dim, DType dtype, int num_units,
                            cudaStream_t stream) {
  if (dtype == DType::kF16) {
    if (head_dim == 64) return LaunchAttentionF16D64(args, num_units, stream);
    if (head_dim == 128) return LaunchAttentionF16D128(args, num_units, stream);
  } else if (dtype == DType::kBF16) {
    if (head_dim == 64) return LaunchAttentionBF16D64(args, num_units, stream);
    if (head_dim == 128) return LaunchAttentionBF16D128(args, num_units, stream);
  }
  return cudaErrorInvalidValue;  // CudaSupports rejects these before any launch
}

int DecodeBlocksPerSm(int head_dim, DType dtype, int rows, int paths, int ring_bytes) {
  if (dtype == DType::kF16)
    return head_dim == 64 ? DecodeBlocksPerSmF16D64(rows, paths, ring_bytes)
                          : DecodeBlocksPerSmF16D128(rows, paths, ring_bytes);
  return head_dim == 64 ? DecodeBlocksPerSmBF16D64(rows, paths, ring_bytes)
                        : DecodeBlocksPerSmBF16D128(rows, paths, ring_bytes);
}

cudaError_t LaunchDecode(const AttnArgs& args, int head_dim, DType dtype, int rows, int paths,
                         int num_units, cudaStream_t stream) {
  if (dtype == DType::kF16) {
    if (head_dim == 64) return LaunchDecodeF16D64(args, rows, paths, num_units, stream);
    if (head_dim == 128) return LaunchDecodeF16D128(args, rows, paths, num_units, stream);
  } else if (dtype == DType::kBF16) {
    if (head_dim == 64) return LaunchDecodeBF16D64(args, rows, paths, num_units, stream);
    if (head_dim == 128) return LaunchDecodeBF16D128(args, rows, paths, num_units, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kvq
