// The flush of one group by one warp (quantize-append, quantize_append.cu): the group's window
// values loaded (keys divided by their key-norm factors), quantized by WarpQuantizeGroup and
// stored where the reference stores them (group index, packed words, scale, zero). Host-compilable
// like warp_quant.cuh: tests/kernels_gpu/flush_emu_test.cc runs it on the CPU over a real arena
// against CpuQuantizeAppend.
#pragma once

#include <cstdint>

#include "kvq/format.h"
#include "kvq/numeric.h"
#include "step_desc.h"
#include "warp_quant.cuh"

namespace kvq {
namespace cuda {

KVQ_WARP float LoadActDev(const uint8_t* arena, int64_t page, int slot, int h,
                                            int c, int d, DType dtype) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(arena + page + FullTokenOffset(slot, h, d) + c * 2);
  return LoadAct(p, dtype);
}

// Flush group gi of tensor x of head h, quantized by the calling warp.
template <int J>
KVQ_WARP void FlushGroup(const QaArgs& a, const DevTensor& x, int h, int gi, bool norm,
                                           const float* knorm, float* err, int lane) {
  constexpr int G = 32 * J;
  const int D = a.head_dim;
  const DType dtype = static_cast<DType>(a.dtype);
  const bool along_channels = x.grouping == static_cast<int>(Grouping::kAlongChannels);
  float v[J];
  int body_tok, group;
  if (along_channels) {
    const int t = gi / (D / G);
    const int c0 = (gi % (D / G)) * G;
    const int w = x.win_first + t;
    const int64_t page = a.pages[x.win_pages + w / kPageTokens];
KVQ_UNROLL
    for (int j = 0; j < J; ++j) {
      const int c = c0 + j * 32 + lane;
      const float raw = LoadActDev(a.arena, page, w % kPageTokens, h, c, D, dtype);
      v[j] = norm ? DivRn(raw, knorm[c]) : raw;
    }
    body_tok = x.body_len + t;
    group = (body_tok % kPageTokens) * (D / G) + c0 / G;
  } else {
    const int tb = gi / D;
    const int c = gi % D;
KVQ_UNROLL
    for (int j = 0; j < J; ++j) {
      const int w = x.win_first + tb * G + j * 32 + lane;
      const float raw = LoadActDev(a.arena, a.pages[x.win_pages + w / kPageTokens], w % kPageTokens, h, c, D, dtype);
      v[j] = norm ? DivRn(raw, knorm[c]) : raw;
    }
    body_tok = x.body_len + tb * G;
    group = ((body_tok % kPageTokens) / G) * D + c;
  }
  uint32_t code[J];
  uint16_t scale_bits = 0, zero_bits = 0;
  if (!WarpQuantizeGroup<J>(v, x.bits, static_cast<QuantMode>(x.mode), err, lane, code, &scale_bits, &zero_bits)) {
    if (lane == 0) warp::SetFlag(a.error_flag, 2);  // non-finite input, or a scale or zero beyond fp16 range
    return;
  }
  uint8_t* head = a.arena + a.pages[x.body_pages + body_tok / kPageTokens] + static_cast<int64_t>(h) * x.head_bytes;
  WarpPackStore<J>(code, x.bits, lane, reinterpret_cast<uint32_t*>(head) + group * x.words_per_group);
  if (lane == 0) {
    reinterpret_cast<uint16_t*>(head + x.scales_offset)[group] = scale_bits;
    if (x.has_zeros) reinterpret_cast<uint16_t*>(head + x.zeros_offset)[group] = zero_bits;
  }
}

}  // namespace cuda
}  // namespace kvq
