// Decode fast path, full-precision units on the tensor cores (included by decode.cuh): the fp16
// preset's batches (every token of K and V in full precision) with 1 to 8 query rows per unit.
//
// Flash-decoding with fp16 / bf16 mma.m16n8k16 (fp32 accumulation), the query rows as the M side:
//   scores  S[16 rows][8 tokens]   = Q[16][16 channels] x K^T[16 channels][8 tokens]
//   values  O[16 rows][8 channels] = P[16][16 tokens] x V[16 tokens][8 channels]
// Rows 8-15 of the M side are always zero (<= 8 rows per unit): half of every product is spent on
// nothing, which the tensor cores can afford; in exchange the score accumulators of a thread are
// exactly the P fragment of the value product (no shuffles), and each thread's row is groupID.
// The query fragments stay in registers for the whole unit. P is rounded to the activation dtype
// (as in FlashAttention); the sums stay fp32.
//
// Tiles of 32 tokens come through the warp's cp.async ring (ring_stages slots of the K and the V
// tile, [32 tokens][D] each, 16-byte chunks XOR-swizzled by token so that ldmatrix reads hit 8
// different bank groups), ring_stages - 1 tiles ahead; each cp.async instruction of the warp covers
// whole rows (2 rows of D = 128, 4 of D = 64), and tokens past the unit's end are zero-filled.
// K fragments come from ldmatrix, V fragments from ldmatrix.trans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kvq {
namespace cuda {

// The warp-wide instructions; KVQ_CUDA_EMU host builds: tests/emu/cuda_emu.h's emulation.
template <DType DT>
__device__ __forceinline__ void MmaF16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::MmaM16N8K16(c, a0, a1, a2, a3, b0, b1, DT == DType::kBF16);
#else
  if constexpr (DT == DType::kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::LdMatrixX4(r, smem, false);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::LdMatrixX4(r, smem, true);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// 16 bytes from global to shared memory, or 16 zero bytes when !valid (src-size 0: nothing is read).
__device__ __forceinline__ void CpAsync16Zfill(void* smem, const void* gmem, bool valid) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::CpAsync(smem, gmem, valid ? 16 : 0);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(n) : "memory");
#endif
}

// Two floats as one register of two activation-dtype halves (the first in the low half).
template <DType DT>
__device__ __forceinline__ uint32_t PackAct2(float lo, float hi) {
  if constexpr (DT == DType::kF16) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Byte offset of 16-byte chunk `chunk` of token row `row` in a swizzled [32][D] tile.
template <int D>
__device__ __forceinline__ int SwzOffset(int row, int chunk) {
  return row * (2 * D) + ((chunk ^ (row & 7)) << 4);
}

// Online softmax of a tile's row g from the score product's accumulators (lane (g, t): tokens
// tile0 + nt * 8 + 2t + e, valid below tok_end and up to the row's position pos): the running
// maximum m (log2 units) and this lane's share of the sum l move on, p gets the tile's
// probabilities; returns the factor of the row's accumulators.
__device__ __forceinline__ float QuadSoftmax(const float (&sc)[4][4], int tile0, int tok_end, int pos, float scale_log2,
                                             int t, float& m, float& l, float (&p)[8]) {
  float x[8];
  float mx = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int tok = tile0 + nt * 8 + 2 * t + e;
      const bool valid = tok < tok_end && tok <= pos;
      x[2 * nt + e] = valid ? sc[nt][e] * scale_log2 : -INFINITY;
      mx = fmaxf(mx, x[2 * nt + e]);
    }
  }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m, mx);
  const float alpha = m == -INFINITY ? 0.f : Exp2Ftz(m - m_new);
  float ps = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    p[i] = m_new == -INFINITY ? 0.f : Exp2Ftz(x[i] - m_new);
    ps += p[i];
  }
  l = l * alpha + ps;
  m = m_new;
  return alpha;
}

// One warp's flash-decoding state on the tensor cores: row g = groupID of the thread (rows >= R are
// zero), the query fragments (A side of the scores), the online softmax (m; l as this thread's
// share, summed over the quad at the end) and the output accumulators O[g][n * 8 + 2t, + 1].
// Tiles are [32 tokens][D] activations in shared memory, swizzled (SwzOffset).
template <int D, DType DT, int R>
struct MmaRows {
  static_assert(R <= 8, "rows 8-15 of the M side are the zero rows");
  static constexpr int KS = D / 16;  // k-steps of the score product
  static constexpr int NT = D / 8;   // n-tiles of the value product
  uint32_t qa[KS][2];
  float m, l, o[NT][4];
  int pos;

  // q: [R][D] floats in shared memory (the unit's rows), pos: their positions (-1: no row)
  __device__ __forceinline__ void Init(const float (*q)[D], const int* rows_pos, int g, int t) {
    const int gr = g < R ? g : 0;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int c = ks * 16 + 2 * t;
      qa[ks][0] = g < R ? PackAct2<DT>(q[gr][c], q[gr][c + 1]) : 0u;
      qa[ks][1] = g < R ? PackAct2<DT>(q[gr][c + 8], q[gr][c + 9]) : 0u;
    }
    pos = g < R ? rows_pos[gr] : -1;
    m = -INFINITY;
    l = 0.f;
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  }

  // Scores of row g for tokens nt * 8 + 2t, + 1 (sc[nt][0], [1]); ldmatrix.x4 = 8 tokens x 32 channels.
  __device__ __forceinline__ void Scores(const uint8_t* kt, int lane, float (&sc)[4][4]) const {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 32; ++kk) {
        uint32_t b[4];
        LdMatrixX4(b, kt + SwzOffset<D>(nt * 8 + (lane & 7), kk * 4 + (lane >> 3)));
        MmaF16<DT>(sc[nt], qa[2 * kk][0], 0u, qa[2 * kk][1], 0u, b[0], b[1]);
        MmaF16<DT>(sc[nt], qa[2 * kk + 1][0], 0u, qa[2 * kk + 1][1], 0u, b[2], b[3]);
      }
    }
  }

  // Online softmax of row g over the tile's tokens [tile0, tile0 + 32) (valid below tok_end and
  // up to pos); the P fragments of the value product: k-step j = tokens 16 j .. + 15.
  __device__ __forceinline__ void Softmax(const float (&sc)[4][4], int tile0, int tok_end, float scale_log2, int t,
                                          uint32_t (&pa)[2][2]) {
    float p[8];
    const float alpha = QuadSoftmax(sc, tile0, tok_end, pos, scale_log2, t, m, l, p);
    // the accumulators change scale only when a row's maximum grew: late in a long unit most
    // tiles leave every row's maximum where it was, and the warp skips the 2 NT multiplies (rows
    // >= R, pos -1, keep m = -inf and alpha 0 on every tile; their accumulators stay 0 unscaled)
    if (__any_sync(0xffffffffu, alpha != 1.f && pos >= 0)) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        o[n][0] *= alpha;
        o[n][1] *= alpha;
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      pa[j][0] = PackAct2<DT>(p[4 * j], p[4 * j + 1]);
      pa[j][1] = PackAct2<DT>(p[4 * j + 2], p[4 * j + 3]);
    }
  }

  // O += P V; ldmatrix.x4.trans = 16 tokens x 16 channels (two n-tiles of one k-step).
  __device__ __forceinline__ void Values(const uint8_t* vt, int lane, const uint32_t (&pa)[2][2]) {
#pragma unroll
    for (int nc = 0; nc < D / 16; ++nc) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t b[4];
        const int mi = lane >> 3;
        LdMatrixX4Trans(b, vt + SwzOffset<D>(16 * j + (mi & 1) * 8 + (lane & 7), nc * 2 + (mi >> 1)));
        MmaF16<DT>(o[2 * nc], pa[j][0], 0u, pa[j][1], 0u, b[0], b[1]);
        MmaF16<DT>(o[2 * nc + 1], pa[j][0], 0u, pa[j][1], 0u, b[2], b[3]);
      }
    }
  }

  // This warp's state for the block's epilogue (rows g < R).
  template <typename Smem>
  __device__ __forceinline__ void Finish(Smem& sm, int warp, int g, int t) {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (g < R) {
      if (t == 0) {
        sm.m[warp][g] = m;
        sm.l[warp][g] = l;
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        sm.w[warp].u.o[g][n * 8 + 2 * t] = o[n][0];
        sm.w[warp].u.o[g][n * 8 + 2 * t + 1] = o[n][1];
      }
    }
  }
};

// Where token t of a full-precision tensor lives (what Locate computes, for tensors without a body:
// the fp16 family's, every token in the sink or the window), from registers.
struct FullLoc {
  int64_t sink_page;
  int win_pages;
  int base;  // window position of token t >= sink_post: t + base
  __device__ __forceinline__ static FullLoc Of(const DevTensor& x, int sink_post) {
    return FullLoc{x.sink_page, x.win_pages, x.win_first - x.body_len - sink_post};  // Locate's window term
  }
  __device__ __forceinline__ TokLoc At(const int64_t* pages, int t, int sink_post) const {
    if (t < sink_post) return TokLoc{sink_page, t, 0};
    const int w = t + base;
    return TokLoc{pages[win_pages + w / kPageTokens], w % kPageTokens, 0};
  }
};

// The per-token units' full-precision tiles (the sink and the windows around a body: every token of
// the tile below the body or past both tensors' flushed body) on the tensor cores, the fragments
// loaded from global memory straight into registers: the per-token instances have no shared-memory
// ring to stage [32][D] activation tiles in (MmaFullUnit's), and a warp tile needs no more loads
// than the per-token path's (16 + 16 of 16 bytes per lane at D = 128, all of them independent).
//   scores  S[16 rows][8 tokens]   = Q[16][16 channels] x K^T[16 channels][8 tokens]
//   values  O^T[16 channels][8 rows] = V^T[16 channels][16 tokens] x P^T[16 tokens][8 rows]
// The channels of both products are a permutation of the row's, which the dot products do not see:
// for the scores, lane (g, t) of n-tile nt holds token nt * 8 + g's 16-byte chunks t, t + 4, ... (a
// quad reads 64 contiguous bytes of a row per instruction), k-step ks taking the halves 4 (ks & 1)
// .. + 3 of chunk t + 4 (ks / 2), and the query fragments the same channels; for the values, lane
// (g, t) owns channels 8 g .. 8 g + 7 (and 64 + 8 g .. at D = 128: chunks g and g + 8 of a row), m-tile
// mt's rows g and g + 8 being its channels mt and mt + MT, of the tokens 16 j + 2t, + 1, + 8, + 9 of
// k-step j. The value product's B side is P^T, whose fragment is the score product's accumulator
// (as in MmaRows); with the channels as its M side its accumulators hold 2 of 8 rows per lane
// (D / 4 registers, half of them unused at R = 4) instead of MmaRows' 1 of 16. P is rounded to the
// activation dtype (as in MmaRows); the sums stay fp32. Whole warp; the state ends in the shared
// memory layout of the per-token path's (Finish), which the per-token loop then continues.
template <int D, DType DT, int R>
struct MmaTokTiles {
  static_assert(R <= 8, "the query rows are the value product's N side");
  static constexpr int KS = D / 16;  // k-steps of the score product
  static constexpr int CQ = D / 32;  // 16-byte chunks of a key row per lane of its quad
  static constexpr int MT = D / 16;  // m-tiles of the value product
  static constexpr int VC = D / 64;  // 16-byte chunks of a value row per lane (chunks g, g + 8)
  uint2* qa;       // the query fragments, [KS][32 lanes] (the warp's area: registers are short here)
  float m, l;      // row g: running maximum (log2 units), this lane's share of the sum
  float o[MT][4];  // O[2t][ch(mt)], O[2t + 1][ch(mt)], O[2t][ch(mt + MT)], O[2t + 1][ch(mt + MT)]
  int pos;         // row g's position (-1: no row)

  // channel i (0 .. 2 MT - 1) of lane group g in the value product
  __device__ __forceinline__ static int VChannel(int g, int i) { return 8 * (g + 8 * (i / 8)) + i % 8; }

  // area: the warp's scratch of KS * 32 uint2 (free until Finish)
  __device__ __forceinline__ void Init(const float (*q)[D], const int* rows_pos, uint2* area, int lane) {
    const int g = lane >> 2;
    const int t = lane & 3;
    const int gr = g < R ? g : 0;
    qa = area;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int c = 8 * (t + 4 * (ks / 2)) + 4 * (ks & 1);
      qa[ks * 32 + lane] = g < R ? make_uint2(PackAct2<DT>(q[gr][c], q[gr][c + 1]), PackAct2<DT>(q[gr][c + 2], q[gr][c + 3]))
                                 : make_uint2(0u, 0u);
    }
    __syncwarp();
    pos = g < R ? rows_pos[gr] : -1;
    m = -INFINITY;
    l = 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
  }

  // The tile [tile0, tile0 + 32): koff / voff are lane = token's row offsets in the arena (-1: past
  // the unit's end, read as zeros).
  __device__ __forceinline__ void Tile(const uint8_t* arena, int64_t koff, int64_t voff, int tile0, int tok_end,
                                       float scale_log2, int lane) {
    const int g = lane >> 2;
    const int t = lane & 3;
    // ---- scores: lane (g, t) loads token nt * 8 + g's chunks t + 4 c
    uint4 kr[4][CQ];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int64_t ko = __shfl_sync(0xffffffffu, koff, nt * 8 + g);
#pragma unroll
      for (int c = 0; c < CQ; ++c)
        kr[nt][c] = ko >= 0 ? __ldg(reinterpret_cast<const uint4*>(arena + ko) + t + 4 * c) : make_uint4(0, 0, 0, 0);
    }
    float sc[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const uint2 q = qa[ks * 32 + lane];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const uint4& w = kr[nt][ks / 2];
        const uint32_t b0 = (ks & 1) ? w.z : w.x;
        const uint32_t b1 = (ks & 1) ? w.w : w.y;
        MmaF16<DT>(sc[nt], q.x, 0u, q.y, 0u, b0, b1);
      }
    }
    // the value rows' offsets: lane (g, t) reads tokens 16 j + 2t + {0, 1, 8, 9}, chunks g + 8 v
    int64_t vo[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) vo[u] = __shfl_sync(0xffffffffu, voff, 16 * (u / 4) + 2 * t + (u & 1) + 8 * ((u >> 1) & 1));
    // ---- online softmax of row g (tokens nt * 8 + 2t + e)
    float p[8];
    const float alpha = QuadSoftmax(sc, tile0, tok_end, pos, scale_log2, t, m, l, p);
    // the accumulators' rows 2t, 2t + 1 take their rows' factors (rows >= R: 0, accumulators 0)
    if (__any_sync(0xffffffffu, alpha != 1.f && pos >= 0)) {
      const float a0 = __shfl_sync(0xffffffffu, alpha, 8 * t);
      const float a1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        o[mt][0] *= a0;
        o[mt][1] *= a1;
        o[mt][2] *= a0;
        o[mt][3] *= a1;
      }
    }
    // ---- O^T += V^T P^T, one k-step (16 tokens) of value rows in registers at a time: k-step j's
    // B fragment is score n-tiles 2j, 2j + 1
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      uint32_t vr[4][VC][4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < VC; ++v) {
          const int64_t ro = vo[4 * j + u];
          const uint4 x = ro >= 0 ? __ldg(reinterpret_cast<const uint4*>(arena + ro) + g + 8 * v) : make_uint4(0, 0, 0, 0);
          vr[u][v][0] = x.x;
          vr[u][v][1] = x.y;
          vr[u][v][2] = x.z;
          vr[u][v][3] = x.w;
        }
      }
      const uint32_t b0 = PackAct2<DT>(p[4 * j], p[4 * j + 1]);
      const uint32_t b1 = PackAct2<DT>(p[4 * j + 2], p[4 * j + 3]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // channel i = mt (A row g) and mt + MT (row g + 8): chunk i / 8, register i % 8 / 2, half i & 1
        const int i0 = mt, i1 = mt + MT;
        const uint32_t* t0 = vr[0][i0 / 8];
        const uint32_t* t1 = vr[1][i0 / 8];
        const uint32_t* t2 = vr[2][i0 / 8];
        const uint32_t* t3 = vr[3][i0 / 8];
        const uint32_t* s0 = vr[0][i1 / 8];
        const uint32_t* s1 = vr[1][i1 / 8];
        const uint32_t* s2 = vr[2][i1 / 8];
        const uint32_t* s3 = vr[3][i1 / 8];
        const uint32_t a0 = PairHalves(t0[i0 % 8 / 2], t1[i0 % 8 / 2], i0 & 1);
        const uint32_t a1 = PairHalves(s0[i1 % 8 / 2], s1[i1 % 8 / 2], i1 & 1);
        const uint32_t a2 = PairHalves(t2[i0 % 8 / 2], t3[i0 % 8 / 2], i0 & 1);
        const uint32_t a3 = PairHalves(s2[i1 % 8 / 2], s3[i1 % 8 / 2], i1 & 1);
        MmaF16<DT>(o[mt], a0, a1, a2, a3, b0, b1);
      }
    }
  }

  // Half `hi` of x (low half of the result) and of y (high half).
  __device__ __forceinline__ static uint32_t PairHalves(uint32_t x, uint32_t y, int hi) {
    return hi ? (x >> 16) | (y & 0xffff0000u) : (x & 0xffffu) | (y << 16);
  }

  // This warp's state in the per-token path's places: sm.m / sm.l [warp][row], ws.u.o[row][channel].
  template <typename Smem>
  __device__ __forceinline__ void Finish(Smem& sm, int warp, int lane) {
    const int g = lane >> 2;
    const int t = lane & 3;
    __syncwarp();  // every lane's last read of the query fragments, which share the area with o
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (g < R && t == 0) {
      sm.m[warp][g] = m;
      sm.l[warp][g] = l;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = 2 * t + (e & 1);
        if (row < R) sm.w[warp].u.o[row][VChannel(g, mt + (e >> 1) * MT)] = o[mt][e];
      }
    }
  }
};

template <int D, DType DT, int R, typename Smem>
__device__ __forceinline__ void MmaFullUnit(Smem& sm, const AttnArgs& a, const DevSeq& s, const DevUnit& unit,
                                            uint8_t* ring, int warp, int lane) {
  constexpr int CH = D * 2 / 16;    // 16-byte chunks per token row: 16 (D = 128) or 8 (D = 64)
  constexpr int RPI = 32 / CH;      // rows per warp-wide cp.async instruction
  constexpr int kTile = 32 * D * 2;  // bytes of one [32][D] tile
  const int g = lane >> 2;  // groupID: this thread's query row
  const int t = lane & 3;
  const int h = unit.kv_head;
  const int stages = a.ring_stages;
  const int slot_bytes = a.ring_slot_bytes;
  auto& ws = sm.w[warp];
  // the tile's row offsets in the arena (K, V), written by lane = token before each issue
  int64_t* rowoff = reinterpret_cast<int64_t*>(&ws.u);
  static_assert(2 * 32 * sizeof(int64_t) <= sizeof(ws.u), "row offsets fit the warp's union");

  MmaRows<D, DT, R> st;
  st.Init(sm.q, sm.pos, g, t);

  // This lane's token of the next tile to issue, located one issue ahead: its page-table loads
  // have a whole tile's compute to arrive. (ncu, (1,32,32,32768), one warp per scheduler: the
  // issue waited on them for ~8% of the warps' samples when it located its own tile.)
  // The segment bounds come from registers (FullLoc), not from the DevSeq in shared memory: the
  // ring's cp.async statements clobber memory, so fields read through `s` were loaded again on
  // every tile.
  TokLoc nk{-1, 0, 0}, nv{-1, 0, 0};
  const int sink_post = s.sink_len + s.to_sink;
  const FullLoc lk = FullLoc::Of(s.k, sink_post), lv = FullLoc::Of(s.v, sink_post);
  auto locate = [&](int tile0) {
    const int tok = tile0 + lane;
    nk.page = nv.page = -1;
    if (tok < unit.tok_end) {
      nk = lk.At(a.pages, tok, sink_post);
      nv = lv.At(a.pages, tok, sink_post);
    }
  };
  locate(unit.tok_begin + warp * 32);
  auto issue = [&](int tile0, int stage) {
    if (tile0 < unit.tok_end) {
      const int64_t ko = nk.page >= 0 ? nk.page + FullTokenOffset(nk.slot, h, D) : -1;
      const int64_t vo = nv.page >= 0 ? nv.page + FullTokenOffset(nv.slot, h, D) : -1;
      locate(tile0 + kDecRingWarps * 32);  // the tile the next issue stages
      uint8_t* dst = ring + stage * slot_bytes;
      const int chunk = lane % CH;
      // A tile inside one page and segment is one run of 32 rows per tensor (head-major pages):
      // its row addresses follow from lane 0's; otherwise (segment or page borders, the unit's
      // end) each row's offset goes through shared memory.
      const int64_t k0 = __shfl_sync(0xffffffffu, ko, 0);
      const int64_t v0 = __shfl_sync(0xffffffffu, vo, 0);
      if (__all_sync(0xffffffffu, ko >= 0 && vo >= 0 && ko == k0 + lane * (2 * D) && vo == v0 + lane * (2 * D))) {
        // this lane's row in the first step; step j adds a compile-time offset of j * RPI rows
        const int64_t lane_off = chunk * 16 + (lane / CH) * (2 * D);
        const uint8_t* ksrc = a.arena + (k0 + lane_off);
        const uint8_t* vsrc = a.arena + (v0 + lane_off);
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          const int row = j * RPI + lane / CH;
          const int so = SwzOffset<D>(row, chunk);
          CpAsync16(dst + so, ksrc + j * RPI * (2 * D));
          CpAsync16(dst + kTile + so, vsrc + j * RPI * (2 * D));
        }
      } else {
        __syncwarp();  // the previous issue's reads of rowoff are done
        rowoff[lane] = ko;
        rowoff[32 + lane] = vo;
        __syncwarp();
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          const int row = j * RPI + lane / CH;
          const int64_t k_off = rowoff[row];
          const int64_t v_off = rowoff[32 + row];
          const int so = SwzOffset<D>(row, chunk);
          CpAsync16Zfill(dst + so, a.arena + (k_off >= 0 ? k_off + chunk * 16 : 0), k_off >= 0);
          CpAsync16Zfill(dst + kTile + so, a.arena + (v_off >= 0 ? v_off + chunk * 16 : 0), v_off >= 0);
        }
      }
    }
    CpAsyncCommit();
  };
  WarpRingTiles(unit.tok_begin + warp * 32, unit.tok_end, stages, issue, [&](int tile0, int slot) {
    const uint8_t* kt = ring + slot * slot_bytes;
    float sc[4][4];
    uint32_t pa[2][2];
    st.Scores(kt, lane, sc);
    st.Softmax(sc, tile0, unit.tok_end, a.scale_log2, t, pa);
    st.Values(kt + kTile, lane, pa);
  });
  st.Finish(sm, warp, g, t);
}

}  // namespace cuda
}  // namespace kvq

#include "decode_mma_kivi.cuh"  // uses MmaRows
#include "decode_kivi_codes.cuh"  // uses MmaF16, PackAct2
