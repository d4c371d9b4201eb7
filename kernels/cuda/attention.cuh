// Split-KV fused attention over sink + quantized body + window (paged), n >= 1 queries per
// sequence (causal within the new tokens), GQA without copying KV.
//
// One block = one DevUnit: a KV head, up to kRowsPerUnit query rows of its group, and a token
// range. Per tile of kTileTokens tokens the block dequantizes K and V straight from the stored
// layout (16-byte loads for full-precision pages, packed codes for body pages; dequantization is
// fused, nothing is written back) into shared memory, computes the scores (one warp per row pair,
// lane = token), updates the online softmax in the same warp, then accumulates P.V (thread =
// channel). The unit writes its unnormalized partial (o, m, l); the merge kernel combines units.
#pragma once

#include <cfloat>

#include "device_common.cuh"

namespace kvq {
namespace cuda {

template <int D, DType DT>
struct AttnSmem {
  static constexpr int kKStride = D + 4;  // padding: 16-byte row reads hit distinct banks
  float q[kRowsPerUnit][D];
  float k[kTileTokens][kKStride];
  float v[kTileTokens][D];
  float p[kRowsPerUnit][kTileTokens];
  float part[kAttnThreads / 32][kRowsPerUnit][kTileTokens];
  float alpha[kRowsPerUnit];
  float m[kRowsPerUnit];
  float l[kRowsPerUnit];
  float knorm[D];
  int pos[kRowsPerUnit];
  TokLoc kloc[2][kTileTokens];  // double-buffered: the next tile is located while this one runs
  TokLoc vloc[2][kTileTokens];
};

template <int D, DType DT>
__device__ __forceinline__ void LoadTile8(const uint8_t* arena, const DevTensor& x, const TokLoc& l,
                                          int h, int c0, float* out) {
  if (l.body) {
    DequantBody8<D>(arena, x, l.page, h, l.slot, c0, out);
  } else {
    const uint8_t* p = arena + l.page + FullTokenOffset(l.slot, h, D) + c0 * 2;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    Unpack8<DT>(v, out);
  }
}

// How a tile of one tensor is loaded. The fast classes issue every load of the tile into
// registers first (several 16-byte loads in flight per thread), then decode; kTileGeneric (a tile
// that mixes body and full-precision tokens, or an unaligned along_tokens tile) decodes per chunk.
enum TileClass : int { kTileGeneric = 0, kTileFull = 1, kTileBodyCh = 2, kTileBodyTok = 3 };

__device__ __forceinline__ int ClassifyTile(const DevSeq& s, const DevTensor& x, int t0, int t1) {
  const int b0 = s.sink_len + s.to_sink;
  const int b1 = b0 + x.body_len + x.flush;  // body tokens are [b0, b1)
  if (b1 == b0 || t1 <= b0 || t0 >= b1) return kTileFull;
  if (t0 >= b0 && t1 <= b1) {
    if (x.grouping == static_cast<int>(Grouping::kAlongChannels)) return kTileBodyCh;
    // A full tile starting on a 32-token boundary of the body lies in one group (G >= 32) of one page.
    if ((t0 - b0) % kTileTokens == 0 && t1 - t0 == kTileTokens) return kTileBodyTok;
  }
  return kTileGeneric;
}

template <int D>
struct TileRaw {
  static constexpr int kPasses = kTileTokens * (D / 8) / kAttnThreads;
  uint32_t w[kPasses * 4];
};

template <int D, DType DT>
__device__ __forceinline__ void IssueTileLoads(int cls, const uint8_t* arena, const DevTensor& x,
                                               const TokLoc* loc, int h, int valid,
                                               TileRaw<D>& raw) {
  constexpr int kChunks = D / 8;
  constexpr int kPasses = TileRaw<D>::kPasses;
  const int tid = threadIdx.x;
  if (cls == kTileFull) {
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int idx = p * kAttnThreads + tid;
      const int t = idx / kChunks;
      const int c0 = (idx % kChunks) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (t < valid) {
        const TokLoc l = loc[t];
        v = __ldg(reinterpret_cast<const uint4*>(
            arena + l.page + FullTokenOffset(l.slot, h, D) + c0 * 2));
      }
      raw.w[4 * p] = v.x;
      raw.w[4 * p + 1] = v.y;
      raw.w[4 * p + 2] = v.z;
      raw.w[4 * p + 3] = v.w;
    }
  } else if (cls == kTileBodyCh) {
    const int G = x.group_size;
    const int bits = x.bits;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int idx = p * kAttnThreads + tid;
      const int t = idx / kChunks;
      const int c0 = (idx % kChunks) * 8;
      uint32_t w0 = 0, w1 = 0, sz = 0;
      const int bitoff = (c0 % G) * bits;
      if (t < valid) {
        const TokLoc l = loc[t];
        const uint8_t* head = arena + l.page + static_cast<int64_t>(h) * x.head_bytes;
        const int g = l.slot * (D / G) + c0 / G;
        const uint32_t* words = reinterpret_cast<const uint32_t*>(head) + g * x.words_per_group + (bitoff >> 5);
        w0 = __ldg(words);
        if ((bitoff & 31) + 8 * bits > 32) w1 = __ldg(words + 1);
        const uint32_t sb = __ldg(reinterpret_cast<const unsigned short*>(head + x.scales_offset) + g);
        const uint32_t zb = x.has_zeros ? __ldg(reinterpret_cast<const unsigned short*>(head + x.zeros_offset) + g) : 0u;
        sz = sb | (zb << 16);
      }
      raw.w[4 * p] = w0;
      raw.w[4 * p + 1] = w1;
      raw.w[4 * p + 2] = sz;
      raw.w[4 * p + 3] = static_cast<uint32_t>(bitoff & 31);
    }
  } else if (cls == kTileBodyTok) {
    // Thread = channel: the group's words for these 32 tokens (bits words, word-aligned), scale, zero.
    if (tid < D) {
      const TokLoc l = loc[0];
      const uint8_t* head = arena + l.page + static_cast<int64_t>(h) * x.head_bytes;
      const int G = x.group_size;
      const int g = (l.slot / G) * D + tid;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(head) + g * x.words_per_group +
                              ((l.slot % G) * x.bits >> 5);
#pragma unroll
      for (int i = 0; i < 4; ++i) raw.w[i] = i < x.bits ? __ldg(words + i) : 0u;
      const uint32_t sb = __ldg(reinterpret_cast<const unsigned short*>(head + x.scales_offset) + g);
      const uint32_t zb = x.has_zeros ? __ldg(reinterpret_cast<const unsigned short*>(head + x.zeros_offset) + g) : 0u;
      raw.w[4] = sb | (zb << 16);
    }
  }
}

__device__ __forceinline__ float2 AffineFromBits(int bits, int mode, uint32_t sz) {
  const float s = __half2float(__ushort_as_half(static_cast<unsigned short>(sz & 0xffffu)));
  const float z = __half2float(__ushort_as_half(static_cast<unsigned short>(sz >> 16)));
  return GroupAffine(bits, mode, s, z);
}

template <int BITS>
__device__ __forceinline__ void DecodeTok32(const uint32_t* w, float a, float b, float f, float* col,
                                            int stride) {
  uint32_t r[BITS];
#pragma unroll
  for (int i = 0; i < BITS; ++i) r[i] = w[i];
#pragma unroll
  for (int t = 0; t < kTileTokens; ++t) {
    const int bit = t * BITS;
    uint32_t c = r[bit >> 5] >> (bit & 31);
    if ((bit & 31) + BITS > 32) c |= r[(bit >> 5) + 1] << (32 - (bit & 31));
    c &= (1u << BITS) - 1u;
    col[t * stride] = (CodeToFloat(c) * a + b) * f;
  }
}

template <int D, DType DT, int STRIDE>
__device__ __forceinline__ void DecodeTile(int cls, const uint8_t* arena, const DevTensor& x,
                                           const TokLoc* loc, int h, int valid,
                                           const TileRaw<D>& raw, const float* knorm,
                                           float (*dst)[STRIDE]) {
  constexpr int kChunks = D / 8;
  constexpr int kPasses = TileRaw<D>::kPasses;
  const int tid = threadIdx.x;
  if (cls == kTileBodyTok) {
    if (tid < D) {
      const float2 ab = AffineFromBits(x.bits, x.mode, raw.w[4]);
      const float f = knorm ? knorm[tid] : 1.f;
      float* col = &dst[0][tid];
      if (x.bits == 2) DecodeTok32<2>(raw.w, ab.x, ab.y, f, col, STRIDE);
      else if (x.bits == 3) DecodeTok32<3>(raw.w, ab.x, ab.y, f, col, STRIDE);
      else DecodeTok32<4>(raw.w, ab.x, ab.y, f, col, STRIDE);
    }
    return;
  }
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int idx = p * kAttnThreads + tid;
    const int t = idx / kChunks;
    const int c0 = (idx % kChunks) * 8;
    float v[8];
    if (cls == kTileFull) {
      Unpack8<DT>(make_uint4(raw.w[4 * p], raw.w[4 * p + 1], raw.w[4 * p + 2], raw.w[4 * p + 3]), v);
    } else if (cls == kTileBodyCh) {
      const int bits = x.bits;
      const float2 ab = AffineFromBits(bits, x.mode, raw.w[4 * p + 2]);
      const uint64_t w64 = (static_cast<uint64_t>(raw.w[4 * p + 1]) << 32 | raw.w[4 * p]) >> raw.w[4 * p + 3];
      const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float f = knorm ? knorm[c0 + e] : 1.f;
        v[e] = (CodeToFloat(static_cast<uint32_t>(w64 >> (e * bits)) & mask) * ab.x + ab.y) * f;
      }
      if (t >= valid) {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0.f;
      }
    } else {  // kTileGeneric
      if (t < valid) {
        const TokLoc l = loc[t];
        LoadTile8<D, DT>(arena, x, l, h, c0, v);
        if (l.body && knorm) {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] *= knorm[c0 + e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0.f;
      }
    }
    float4* d = reinterpret_cast<float4*>(&dst[t][c0]);
    d[0] = make_float4(v[0], v[1], v[2], v[3]);
    d[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

template <int D, int R, typename Smem>
__device__ __forceinline__ void ScoresPhase(Smem& sm, int warp, int lane) {
  constexpr int kSlice = D / (kAttnThreads / 32);
  float dot[R];
#pragma unroll
  for (int r = 0; r < R; ++r) dot[r] = 0.f;
#pragma unroll
  for (int c = warp * kSlice; c < (warp + 1) * kSlice; c += 4) {
    const float4 kk = *reinterpret_cast<const float4*>(&sm.k[lane][c]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 qq = *reinterpret_cast<const float4*>(&sm.q[r][c]);
      dot[r] += kk.x * qq.x + kk.y * qq.y + kk.z * qq.z + kk.w * qq.w;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) sm.part[warp][r][lane] = dot[r];
}

template <int D, int R, typename Smem>
__device__ __forceinline__ void PvPhase(Smem& sm, float* acc, int pv_c, int pv_r0) {
  constexpr int kRowStep = kAttnThreads / D;
#pragma unroll
  for (int i = 0; i < kRowsPerUnit * D / kAttnThreads; ++i) {
    const int r = pv_r0 + i * kRowStep;
    if (i * kRowStep < R && r < R) {
      float o = acc[i] * sm.alpha[r];
#pragma unroll 8
      for (int t = 0; t < kTileTokens; ++t) o += sm.p[r][t] * sm.v[t][pv_c];
      acc[i] = o;
    }
  }
}

template <int D, DType DT>
__global__ void __launch_bounds__(kAttnThreads, 5) AttentionKernel(AttnArgs a) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  constexpr int kRowsPerThread = kRowsPerUnit * D / kAttnThreads;
  constexpr int kRowStep = kAttnThreads / D;           // PV: thread = (channel, row phase)
  __shared__ __align__(16) AttnSmem<D, DT> sm;

  const DevUnit unit = a.units[blockIdx.x];
  __shared__ __align__(16) DevSeq seq_s;
  LoadSeqToShared<kAttnThreads>(a.seqs + unit.seq, &seq_s);
  GridDependencyWait();  // every unit: the prefill units read the tokens this step appends
  __syncthreads();
  const DevSeq& s = seq_s;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int h = unit.kv_head;

  // Query rows: row = i * g + j reads query token i, query head h * g + j.
  for (int idx = tid; idx < kRowsPerUnit * D; idx += kAttnThreads) {
    const int r = idx / D;
    const int c = idx % D;
    sm.q[r][c] = UnitQuery<D, DT>(a.q, a.num_q_heads, a.group, s, unit, r, c);
  }
  if (tid < kRowsPerUnit) {
    int pos = -1;
    if (tid < unit.num_rows) pos = s.length - s.n_new + (unit.row0 + tid) / a.group;
    sm.pos[tid] = pos;
    sm.m[tid] = -INFINITY;
    sm.l[tid] = 0.f;
    sm.alpha[tid] = 0.f;  // rows past num_rows keep alpha = 0 and p = 0 (their output is unused)
  }
  for (int i = tid; i < kRowsPerUnit * kTileTokens; i += kAttnThreads) (&sm.p[0][0])[i] = 0.f;
  for (int c = tid; c < D; c += kAttnThreads) {
    sm.knorm[c] = s.key_norm ? reinterpret_cast<const float*>(a.arena + s.norm_offset)[h * D + c] : 1.f;
  }
  float acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.f;
  const int pv_c = tid % D;
  const int pv_r0 = tid / D;
  const int row_class = unit.num_rows <= 1 ? 1 : unit.num_rows <= 2 ? 2 : unit.num_rows <= 4 ? 4 : kRowsPerUnit;

  // Software pipeline: tile i+1 is located and its loads are issued right after tile i is
  // decoded, so its memory latency overlaps tile i's scores, softmax and P.V.
  auto locate = [&](int tile0, int b) {
    if (tid < kTileTokens) {
      const int t = tile0 + tid;
      if (t < unit.tok_end) sm.kloc[b][tid] = Locate(s, s.k, a.pages, t);
    } else if (tid < 2 * kTileTokens) {
      const int t = tile0 + tid - kTileTokens;
      if (t < unit.tok_end) sm.vloc[b][tid - kTileTokens] = Locate(s, s.v, a.pages, t);
    }
  };
  int buf = 0;
  TileRaw<D> rk, rv;
  int kc = kTileFull, vc = kTileFull;
  if (unit.tok_begin < unit.tok_end) {
    locate(unit.tok_begin, 0);
    __syncthreads();
    const int t1 = min(unit.tok_begin + kTileTokens, unit.tok_end);
    kc = ClassifyTile(s, s.k, unit.tok_begin, t1);
    vc = ClassifyTile(s, s.v, unit.tok_begin, t1);
    IssueTileLoads<D, DT>(kc, a.arena, s.k, sm.kloc[0], h, t1 - unit.tok_begin, rk);
    IssueTileLoads<D, DT>(vc, a.arena, s.v, sm.vloc[0], h, t1 - unit.tok_begin, rv);
  }
  for (int tile0 = unit.tok_begin; tile0 < unit.tok_end; tile0 += kTileTokens) {
    // The next tile's page lookups (one global load per token) go out before this tile is
    // decoded and land in shared memory after it, so their latency overlaps the decode.
    const int next = tile0 + kTileTokens;
    TokLoc next_loc;
    const bool has_next_loc = next < unit.tok_end && tid < 2 * kTileTokens && next + (tid % kTileTokens) < unit.tok_end;
    if (has_next_loc) next_loc = Locate(s, tid < kTileTokens ? s.k : s.v, a.pages, next + tid % kTileTokens);
    {
      const int valid = min(tile0 + kTileTokens, unit.tok_end) - tile0;
      DecodeTile<D, DT, AttnSmem<D, DT>::kKStride>(kc, a.arena, s.k, sm.kloc[buf], h, valid,
                                                  rk, s.key_norm ? sm.knorm : nullptr, sm.k);
      DecodeTile<D, DT, D>(vc, a.arena, s.v, sm.vloc[buf], h, valid, rv, nullptr, sm.v);
    }
    if (has_next_loc) {
      if (tid < kTileTokens) sm.kloc[buf ^ 1][tid] = next_loc;
      else sm.vloc[buf ^ 1][tid - kTileTokens] = next_loc;
    }
    __syncthreads();  // decoded tiles and the next tile's locations are visible
    if (next < unit.tok_end) {
      const int t1 = min(next + kTileTokens, unit.tok_end);
      kc = ClassifyTile(s, s.k, next, t1);
      vc = ClassifyTile(s, s.v, next, t1);
      IssueTileLoads<D, DT>(kc, a.arena, s.k, sm.kloc[buf ^ 1], h, t1 - next, rk);
      IssueTileLoads<D, DT>(vc, a.arena, s.v, sm.vloc[buf ^ 1], h, t1 - next, rv);
    }
    buf ^= 1;
    // Scores: warp w sums its quarter of the channels for every row (lane = token), so every
    // warp has work whatever the row count; the partial sums meet in shared memory. The row
    // count is rounded up to 1, 2, 4 or 8 so the loops are unrolled (extra rows are zero).
    switch (row_class) {
      case 1: ScoresPhase<D, 1>(sm, warp, lane); break;
      case 2: ScoresPhase<D, 2>(sm, warp, lane); break;
      case 4: ScoresPhase<D, 4>(sm, warp, lane); break;
      default: ScoresPhase<D, kRowsPerUnit>(sm, warp, lane); break;
    }
    __syncthreads();
    // Online softmax: warp w owns rows w and w + 4; lane = token of the tile.
    for (int r = warp; r < kRowsPerUnit; r += kAttnThreads / 32) {
      if (r >= unit.num_rows) break;
      const int t = tile0 + lane;
      float dot = 0.f;
#pragma unroll
      for (int w = 0; w < kAttnThreads / 32; ++w) dot += sm.part[w][r][lane];
      const bool valid = t < unit.tok_end && t <= sm.pos[r];
      const float sc = valid ? dot * a.scale_log2 : -INFINITY;
      float mx = sc;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = sm.m[r];
      const float m_new = fmaxf(m_old, mx);
      const float p = (m_new == -INFINITY) ? 0.f : exp2f(sc - m_new);
      float sum = p;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      sm.p[r][lane] = p;
      __syncwarp();
      if (lane == 0) {
        const float alpha = (m_old == -INFINITY) ? 0.f : exp2f(m_old - m_new);
        sm.alpha[r] = alpha;
        sm.l[r] = sm.l[r] * alpha + sum;
        sm.m[r] = m_new;
      }
    }
    __syncthreads();
    // P.V: thread owns channel pv_c of rows pv_r0, pv_r0 + kRowStep, ...
    switch (row_class) {
      case 1: PvPhase<D, 1>(sm, acc, pv_c, pv_r0); break;
      case 2: PvPhase<D, 2>(sm, acc, pv_c, pv_r0); break;
      case 4: PvPhase<D, 4>(sm, acc, pv_c, pv_r0); break;
      default: PvPhase<D, kRowsPerUnit>(sm, acc, pv_c, pv_r0); break;
    }
    __syncthreads();  // sm.k / sm.v / sm.p consumed before the next tile is decoded into them
  }
  __syncthreads();
  float* po = a.part_o + static_cast<int64_t>(blockIdx.x) * kRowsPerUnit * D;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = pv_r0 + i * kRowStep;
    po[r * D + pv_c] = acc[i];
  }
  if (tid < kRowsPerUnit) {
    float* pm = a.part_ml + (static_cast<int64_t>(blockIdx.x) * kRowsPerUnit + tid) * 2;
    pm[0] = sm.m[tid];
    pm[1] = sm.l[tid];
  }
}

template <int D, DType DT>
int AttentionBlocksPerSmT() {
  static OccupancyMemo memo;  // per device; the kernel takes no dynamic shared memory
  return BlocksPerSmNoSmem(&memo, AttentionKernel<D, DT>, kAttnThreads);
}

template <int D, DType DT>
cudaError_t LaunchAttentionT(const AttnArgs& args, int num_units, cudaStream_t stream) {
  if (num_units <= 0) return cudaSuccess;
  return LaunchAttnKernel(AttentionKernel<D, DT>, num_units, kAttnThreads, 0, stream, args);
}

}  // namespace cuda
}  // namespace kvq
