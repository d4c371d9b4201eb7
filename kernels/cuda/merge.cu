// Merge of split-KV partial states: for each (sequence, KV head, row block) combine the units'
// unnormalized (o, m, l) into the final output. Edge cases: a unit whose tokens are all masked
// for a row has m = -inf and l = 0 and gets weight 0; a row always sees at least itself, so the
// combined l is > 0.
#include "device_common.cuh"

namespace kvq {
namespace cuda {
namespace {

template <int D, DType DT>
__global__ void __launch_bounds__(128) MergeKernel(MergeArgs a) {
  const DevMergeItem it = a.items[blockIdx.x];
  const DevSeq& s = a.seqs[it.seq];
  for (int idx = threadIdx.x; idx < it.num_rows * D; idx += blockDim.x) {
    const int r = idx / D;
    const int c = idx % D;
    const float* ml = a.part_ml + (static_cast<int64_t>(it.unit0) * kRowsPerUnit + r) * 2;
    const float* po = a.part_o + (static_cast<int64_t>(it.unit0) * kRowsPerUnit + r) * D + c;
    constexpr int kStride = kRowsPerUnit * 2;
    float m = -INFINITY;
    // Unrolled, branch-free loops: the loads of several units are in flight together.
#pragma unroll 8
    for (int u = 0; u < it.num_units; ++u) m = fmaxf(m, ml[u * kStride]);
    float l = 0.f, o = 0.f;
    if (m != -INFINITY) {
#pragma unroll 8
      for (int u = 0; u < it.num_units; ++u) {
        const float mu = ml[u * kStride];
        const float w = mu == -INFINITY ? 0.f : exp2f(mu - m);
        l += w * ml[u * kStride + 1];
        o += w * po[static_cast<int64_t>(u) * kRowsPerUnit * D];
      }
    }
    const float out = l > 0.f ? o / l : 0.f;
    const int row = it.row0 + r;
    const int i = row / a.group;
    const int hq = it.kv_head * a.group + row % a.group;
    a.o[((s.q_row + i) * a.num_q_heads + hq) * D + c] = FloatToAct<DT>(out);
  }
}

template <int D, DType DT>
cudaError_t Launch(const MergeArgs& args, int num_items, cudaStream_t stream) {
  if (num_items <= 0) return cudaSuccess;
  MergeKernel<D, DT><<<num_items, 128, 0, stream>>>(args);
  return cudaGetLastError();
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
