// Quantize-append for a whole batch in one launch (plus, on a step that first quantizes keys
// with key normalization, one small launch before it for the factors).
//   1. flush: the oldest `flush` window tokens are quantized and packed into body tokens
//      [body_len, body_len + flush) (keys divided by the key-norm factors when key_norm), one warp
//      per group, lane = element: the warp computes exactly what the CPU reference's
//      QuantizeGroupRef computes (same per-element uncontracted arithmetic; min / max reductions
//      that keep the first element of the extreme value, as the sequential loop does, so even the
//      sign of a zero matches; the hybrid L1 errors summed in element order from shared memory),
//      so codes, scales and zeros are bit-identical;
//   2. append: the new tokens go to the sink first, then after the window's last token.
// Grid (sequence, KV head, 2 x chunks): z even = K, odd = V; the chunks of a tensor split its
// groups between blocks (a 32-token along_tokens flush at D = 128 is 128 groups per head), and
// chunk 0 also appends. Existing pages are never moved; the flushed window slots are left as they
// are (the planner frees emptied window pages).
#include "device_common.cuh"
#include "kvq/numeric.h"
#include "kvq/quant.h"
#include "flush_group.cuh"

namespace kvq {
namespace cuda {
namespace {

constexpr int kQaWarps = kQaThreads / 32;

// Key-norm factors from the first flushed keys (max |k| per channel), for the sequences that
// quantize keys for the first time this step; block (sequence, KV head), thread = channel.
__global__ void __launch_bounds__(kQaThreads) KeyNormKernel(QaArgs a) {
  const DevSeq& s = a.seqs[blockIdx.x];
  const DevTensor& x = s.k;
  if (!s.compute_norm || !s.key_norm || x.flush <= 0 || x.mode == static_cast<int>(QuantMode::kFull)) return;
  const int h = blockIdx.y;
  const int D = a.head_dim;
  const DType dtype = static_cast<DType>(a.dtype);
  float* f = reinterpret_cast<float*>(a.arena + s.norm_offset) + h * D;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float mx = 0.f;
    for (int t = 0; t < x.flush; ++t) {
      const int w = x.win_first + t;
      mx = MaxF(mx, AbsF(LoadActDev(a.arena, a.pages[x.win_pages + w / kPageTokens], w % kPageTokens, h, c, D, dtype)));
    }
    f[c] = KeyNormFactor(mx);
  }
}

__global__ void __launch_bounds__(kQaThreads) QuantizeAppendKernel(QaArgs a) {
  GridDependentsLaunch();  // the attention may launch now; it waits for this grid to complete
  const DevSeq& s = a.seqs[blockIdx.x];
  const int h = blockIdx.y;
  const bool is_k = (blockIdx.z & 1) == 0;
  const int chunk = blockIdx.z >> 1;
  const int num_chunks = gridDim.z >> 1;
  const DevTensor& x = is_k ? s.k : s.v;
  const int D = a.head_dim;
  const int hkv = a.num_kv_heads;
  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  __shared__ float knorm[256];
  __shared__ float err[kQaWarps][2 * kMaxGroupSize];

  if (x.flush > 0 && x.mode != static_cast<int>(QuantMode::kFull)) {
    const int G = x.group_size;
    const bool along_channels = x.grouping == static_cast<int>(Grouping::kAlongChannels);
    const int num_groups = along_channels ? x.flush * (D / G) : (x.flush / G) * D;
    if (chunk * kQaWarps < num_groups) {  // block-uniform
      const bool norm = is_k && s.key_norm;
      if (norm) {  // factors of this step's KeyNormKernel, or of an earlier step
        const float* f = reinterpret_cast<const float*>(a.arena + s.norm_offset) + h * D;
        for (int c = tid; c < D; c += blockDim.x) knorm[c] = f[c];
        __syncthreads();
      }
      for (int gi = chunk * kQaWarps + warp; gi < num_groups; gi += num_chunks * kQaWarps) {
        if (G == 32) {
          FlushGroup<1>(a, x, h, gi, norm, knorm, err[warp], lane);
        } else if (G == 64) {
          FlushGroup<2>(a, x, h, gi, norm, knorm, err[warp], lane);
        } else {
          FlushGroup<4>(a, x, h, gi, norm, knorm, err[warp], lane);
        }
      }
    }
  }
  if (chunk != 0) return;

  // Append: 16-byte copies of the new rows of this head.
  const uint16_t* src = is_k ? a.k_new : a.v_new;
  const int chunks = D / 8;
  for (int idx = tid; idx < s.n_new * chunks; idx += blockDim.x) {
    const int j = idx / chunks;
    const int c0 = (idx % chunks) * 8;
    int64_t page;
    int slot;
    if (j < s.to_sink) {
      page = x.sink_page;
      slot = s.sink_len + j;
    } else {
      const int w = x.win_first + x.win_len + (j - s.to_sink);
      page = a.pages[x.win_pages + w / kPageTokens];
      slot = w % kPageTokens;
    }
    const uint4 v = *reinterpret_cast<const uint4*>(src + ((s.kv_row + j) * hkv + h) * D + c0);
    *reinterpret_cast<uint4*>(a.arena + page + FullTokenOffset(slot, h, D) + c0 * 2) = v;
  }
}

}  // namespace

cudaError_t LaunchQuantizeAppend(const QaArgs& args, int num_seqs, int chunks, bool key_norm, cudaStream_t stream) {
  if (num_seqs <= 0) return cudaSuccess;
  if (key_norm) {
    KeyNormKernel<<<dim3(num_seqs, args.num_kv_heads), kQaThreads, 0, stream>>>(args);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(num_seqs, args.num_kv_heads, 2 * chunks);
  QuantizeAppendKernel<<<grid, kQaThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvq
