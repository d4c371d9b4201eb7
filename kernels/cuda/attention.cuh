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
  float alpha[kRowsPerUnit];
  float m[kRowsPerUnit];
  float l[kRowsPerUnit];
  float knorm[D];
  int pos[kRowsPerUnit];
  TokLoc kloc[kTileTokens];
  TokLoc vloc[kTileTokens];
};

template <int D, DType DT>
__device__ __forceinline__ void LoadTile8(const uint8_t* arena, const DevTensor& x, const TokLoc& l,
                                          int h, int num_kv_heads, int c0, float* out) {
  if (l.body) {
    DequantBody8<D>(arena, x, l.page, h, l.slot, c0, out);
  } else {
    const uint8_t* p = arena + l.page +
                       (static_cast<int64_t>(l.slot) * num_kv_heads + h) * D * 2 + c0 * 2;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    Unpack8<DT>(v, out);
  }
}

template <int D, DType DT>
__global__ void __launch_bounds__(kAttnThreads) AttentionKernel(AttnArgs a) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  constexpr int kChunks = D / 8;                       // 8-channel chunks per token
  constexpr int kRowsPerThread = kRowsPerUnit * D / kAttnThreads;
  constexpr int kRowStep = kAttnThreads / D;           // PV: thread = (channel, row phase)
  __shared__ __align__(16) AttnSmem<D, DT> sm;

  const DevUnit unit = a.units[blockIdx.x];
  const DevSeq& s = a.seqs[unit.seq];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int h = unit.kv_head;

  // Query rows: row = i * g + j reads query token i, query head h * g + j.
  for (int idx = tid; idx < kRowsPerUnit * D; idx += kAttnThreads) {
    const int r = idx / D;
    const int c = idx % D;
    float qv = 0.f;
    if (r < unit.num_rows) {
      const int row = unit.row0 + r;
      const int i = row / a.group;
      const int hq = h * a.group + row % a.group;
      qv = ActToFloat<DT>(a.q[((s.q_row + i) * a.num_q_heads + hq) * D + c]);
    }
    sm.q[r][c] = qv;
  }
  if (tid < kRowsPerUnit) {
    int pos = -1;
    if (tid < unit.num_rows) pos = s.length - s.n_new + (unit.row0 + tid) / a.group;
    sm.pos[tid] = pos;
    sm.m[tid] = -INFINITY;
    sm.l[tid] = 0.f;
  }
  for (int c = tid; c < D; c += kAttnThreads) {
    sm.knorm[c] = s.key_norm ? reinterpret_cast<const float*>(a.arena + s.norm_offset)[h * D + c] : 1.f;
  }
  float acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.f;
  const int pv_c = tid % D;
  const int pv_r0 = tid / D;

  for (int tile0 = unit.tok_begin; tile0 < unit.tok_end; tile0 += kTileTokens) {
    __syncthreads();  // previous tile fully consumed (and the prologue written)
    if (tid < kTileTokens) {
      const int t = tile0 + tid;
      if (t < unit.tok_end) sm.kloc[tid] = Locate(s, s.k, a.pages, t);
    } else if (tid < 2 * kTileTokens) {
      const int t = tile0 + tid - kTileTokens;
      if (t < unit.tok_end) sm.vloc[tid - kTileTokens] = Locate(s, s.v, a.pages, t);
    }
    __syncthreads();
    // Dequantize K and V tiles: each thread takes (token, 8-channel chunk) pairs; the loads of a
    // pass are independent, so several are in flight per thread.
#pragma unroll
    for (int pass = 0; pass < kTileTokens * kChunks / kAttnThreads; ++pass) {
      const int idx = pass * kAttnThreads + tid;
      const int t = idx / kChunks;
      const int c0 = (idx % kChunks) * 8;
      float kv[8], vv[8];
      if (tile0 + t < unit.tok_end) {
        const TokLoc kl = sm.kloc[t];
        const TokLoc vl = sm.vloc[t];
        LoadTile8<D, DT>(a.arena, s.k, kl, h, a.num_kv_heads, c0, kv);
        LoadTile8<D, DT>(a.arena, s.v, vl, h, a.num_kv_heads, c0, vv);
        if (kl.body && s.key_norm) {
#pragma unroll
          for (int e = 0; e < 8; ++e) kv[e] *= sm.knorm[c0 + e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kv[e] = vv[e] = 0.f;
      }
      float4* kd = reinterpret_cast<float4*>(&sm.k[t][c0]);
      kd[0] = make_float4(kv[0], kv[1], kv[2], kv[3]);
      kd[1] = make_float4(kv[4], kv[5], kv[6], kv[7]);
      float4* vd = reinterpret_cast<float4*>(&sm.v[t][c0]);
      vd[0] = make_float4(vv[0], vv[1], vv[2], vv[3]);
      vd[1] = make_float4(vv[4], vv[5], vv[6], vv[7]);
    }
    __syncthreads();
    // Scores and online softmax: warp w owns rows w and w + 4; lane = token of the tile.
    for (int r = warp; r < kRowsPerUnit; r += kAttnThreads / 32) {
      if (r >= unit.num_rows) break;
      const int t = tile0 + lane;
      float dot = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; c += 4) {
        const float4 kk = *reinterpret_cast<const float4*>(&sm.k[lane][c]);
        const float4 qq = *reinterpret_cast<const float4*>(&sm.q[r][c]);
        dot += kk.x * qq.x + kk.y * qq.y + kk.z * qq.z + kk.w * qq.w;
      }
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
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = pv_r0 + i * kRowStep;
      if (r < unit.num_rows) {
        float o = acc[i] * sm.alpha[r];
#pragma unroll 8
        for (int t = 0; t < kTileTokens; ++t) o += sm.p[r][t] * sm.v[t][pv_c];
        acc[i] = o;
      }
    }
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
cudaError_t LaunchAttentionT(const AttnArgs& args, int num_units, cudaStream_t stream) {
  if (num_units <= 0) return cudaSuccess;
  AttentionKernel<D, DT><<<num_units, kAttnThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvq
