// Quantize-append for a whole batch in one launch: block (sequence, KV head, K or V).
//   1. flush: the oldest `flush` window tokens are quantized and packed into body tokens
//      [body_len, body_len + flush) (key-norm factors first computed from the flushed keys when
//      compute_norm; keys divided by them when key_norm), with the CPU reference's own
//      header-inline quantizer, so codes, scales and zeros are bit-identical;
//   2. append: the new tokens go to the sink first, then after the window's last token.
// Existing pages are never moved; the flushed window slots are left as they are (the planner
// frees emptied window pages).
#include "device_common.cuh"
#include "kvq/numeric.h"
#include "kvq/quant.h"

namespace kvq {
namespace cuda {
namespace {

constexpr int kMaxGroup = kMaxGroupSize;

__device__ __forceinline__ float LoadActDev(const uint8_t* arena, int64_t page, int slot, int h,
                                            int c, int d, DType dtype) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(
      arena + page + FullTokenOffset(slot, h, d) + c * 2);
  return LoadAct(p, dtype);
}

__global__ void __launch_bounds__(kQaThreads) QuantizeAppendKernel(QaArgs a) {
  const DevSeq& s = a.seqs[blockIdx.x];
  const int h = blockIdx.y;
  const bool is_k = blockIdx.z == 0;
  const DevTensor& x = is_k ? s.k : s.v;
  const int D = a.head_dim;
  const int hkv = a.num_kv_heads;
  const DType dtype = static_cast<DType>(a.dtype);
  const int tid = threadIdx.x;
  __shared__ float knorm[256];

  if (x.flush > 0 && x.mode != static_cast<int>(QuantMode::kFull)) {
    const bool norm = is_k && s.key_norm;
    if (norm) {
      float* f = reinterpret_cast<float*>(a.arena + s.norm_offset) + h * D;
      for (int c = tid; c < D; c += blockDim.x) {
        if (s.compute_norm) {
          float mx = 0.f;
          for (int t = 0; t < x.flush; ++t) {
            const int w = x.win_first + t;
            const float v = LoadActDev(a.arena, a.pages[x.win_pages + w / kPageTokens],
                                       w % kPageTokens, h, c, D, dtype);
            mx = MaxF(mx, AbsF(v));
          }
          f[c] = KeyNormFactor(mx);
        }
        knorm[c] = f[c];
      }
      __syncthreads();
    }
    const int G = x.group_size;
    const bool along_channels = x.grouping == static_cast<int>(Grouping::kAlongChannels);
    const int num_groups = along_channels ? x.flush * (D / G) : (x.flush / G) * D;
    const QuantMode mode = static_cast<QuantMode>(x.mode);
    for (int gi = tid; gi < num_groups; gi += blockDim.x) {
      float vals[kMaxGroup];
      uint8_t codes[kMaxGroup];
      int body_tok, group;
      if (along_channels) {
        const int t = gi / (D / G);
        const int c0 = (gi % (D / G)) * G;
        const int w = x.win_first + t;
        const int64_t page = a.pages[x.win_pages + w / kPageTokens];
        for (int i = 0; i < G; ++i) {
          const float v = LoadActDev(a.arena, page, w % kPageTokens, h, c0 + i, D, dtype);
          vals[i] = norm ? DivRn(v, knorm[c0 + i]) : v;
        }
        body_tok = x.body_len + t;
        group = (body_tok % kPageTokens) * (D / G) + c0 / G;
      } else {
        const int tb = gi / D;
        const int c = gi % D;
        for (int i = 0; i < G; ++i) {
          const int w = x.win_first + tb * G + i;
          const float v = LoadActDev(a.arena, a.pages[x.win_pages + w / kPageTokens],
                                     w % kPageTokens, h, c, D, dtype);
          vals[i] = norm ? DivRn(v, knorm[c]) : v;
        }
        body_tok = x.body_len + tb * G;
        group = ((body_tok % kPageTokens) / G) * D + c;
      }
      uint16_t scale_bits = 0, zero_bits = 0;
      if (!QuantizeGroupRef(vals, G, x.bits, mode, codes, &scale_bits, &zero_bits)) {
        atomicExch(a.error_flag, 2);  // non-finite input, or a scale or zero beyond fp16 range
      }
      uint8_t* head = a.arena + a.pages[x.body_pages + body_tok / kPageTokens] +
                      static_cast<int64_t>(h) * x.head_bytes;
      uint32_t* words = reinterpret_cast<uint32_t*>(head) + group * x.words_per_group;
      uint32_t packed[kMaxGroup * 4 / 32];
      PackCodes(codes, G, x.bits, packed);
      for (int w = 0; w < x.words_per_group; ++w) words[w] = packed[w];
      reinterpret_cast<uint16_t*>(head + x.scales_offset)[group] = scale_bits;
      if (x.has_zeros) reinterpret_cast<uint16_t*>(head + x.zeros_offset)[group] = zero_bits;
    }
  }

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

cudaError_t LaunchQuantizeAppend(const QaArgs& args, int num_seqs, cudaStream_t stream) {
  if (num_seqs <= 0) return cudaSuccess;
  const dim3 grid(num_seqs, args.num_kv_heads, 2);
  QuantizeAppendKernel<<<grid, kQaThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvq
