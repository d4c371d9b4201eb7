// Decode fast path, InnerQ body units on the tensor cores (included by decode.cuh).
//
// InnerQ groups both tensors along the inner dimension of their product (keys along channels,
// values along tokens, G = 32), so one 32-wide group is exactly the k = 32 of one integer
// tensor-core product mma.m16n8k32 (u8 codes x s8 operands, s32 accumulation), and each group's
// scale is applied once per (token, group) for the keys and once per (channel, tile) for the
// values, after the integer sum:
//   scores, transposed: S^T[16 tokens][8 cols] = K codes[16 tokens][32 channels of group g] x Qb[32][8]
//   values, transposed: O^T[16 channels][8 cols] = V codes[16 channels][32 tokens] x Pb[32][8]
// The 8 columns are 4 query rows x (high byte, low byte) of a 16-bit fixed-point copy of q' (per
// row scaled to +-32000) or of p (scaled by 32000): column 2r holds the high signed byte, 2r + 1
// the low one (v = 256 hi + lo, lo in [-128, 127]), so hi * 256 + lo of the two accumulators is the
// exact integer product with the 16-bit operand: no fp16 rounding of q or p, only their 16-bit
// fixed-point rounding (<= 2^-16 of the row's largest |q'|, of 1 for p).
//
// Codes reach the A fragments as bytes with one shift and one LOP3 per 4 codes (2, 4 bits) or a
// funnel shift and five logic ops per 8 codes (3 bits). Inside the 32-wide group the fragment's
// k order is a fixed permutation of the physical positions (SlotPhys), applied to the other
// operand when it is built; 3-bit codes sit at bit offset 0, 1 or 2 of their byte (SlotShift), and
// the other operand's byte is scaled by 2^-offset to match.
//
// Units of this kind (DevUnit::kind == kUnitImmaBody) hold only body tokens of both K and V in
// whole 32-token tiles; the item's sink and window go to one per-token unit that steps over them
// (DevUnit::skip_begin / skip_end). The tiles come through the warp's cp.async ring, ring_stages - 1
// tiles ahead. 2 to 4 rows per unit (one row: the per-token path's dp4a products are cheaper).
// The byte-slot helpers are in code_bytes.cuh.
#pragma once

#include "code_bytes.cuh"

namespace kvq {
namespace cuda {

__device__ __forceinline__ void Imma16832(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::ImmaM16N8K32(c, a0, a1, a2, a3, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// The scales alone of N consecutive groups of a staged tile (symmetric keys: a = s, b = -L s).
template <int N>
__device__ __forceinline__ void TileScales(const BodySrc& b, int lane, float* out) {
  float sv[N];
  LoadHalves<N, true>(b.scales + 2 * lane * N, sv);
  if constexpr (N == 4) {
    *reinterpret_cast<float4*>(out + lane * N) = make_float4(sv[0], sv[1], sv[2], sv[3]);
  } else {
    *reinterpret_cast<float2*>(out + lane * N) = make_float2(sv[0], sv[1]);
  }
}

// The (a, b) of N consecutive groups of a staged tile (lane's N entries: scales at 2 * lane * N);
// MODE as in LoadScaleZero / GroupAffineM.
template <int N, int MODE>
__device__ __forceinline__ void TileAffine(const BodySrc& b, const DevTensor& x, int bits, int lane, float2* out) {
  float sv[N], zv[N];
  LoadScaleZero<N, true, MODE>(b, x, lane * N, sv, zv);
#pragma unroll
  for (int j = 0; j < N; ++j) out[lane * N + j] = GroupAffineM<MODE>(bits, x.mode, sv[j], zv[j]);
}

// PAGES: a page unit (kUnitPages, decode_pages.cuh): the tiles come from the block's ring of whole
// pages (ring = the block's dynamic shared memory) instead of the warp's cp.async ring (ring = the
// warp's).
// KM, VM: the keys' and values' modes when known at compile time (the presets' combinations), else
// kModeAny. Symmetric keys (a = s, b = -L s with L = 2^(KB-1) - 1 for every group): the tile's key
// set-up stores a alone, and b * qsum is a * (-L qsum), the second factor held per unit.
template <int D, int R, int KB, int VB, bool PAGES, int KM, int VM, typename Smem>
__device__ __forceinline__ void ImmaBodyUnit(Smem& sm, const AttnArgs& a, const DevSeq& s, const DevUnit& unit,
                                             uint8_t* ring, int warp, int lane) {
  constexpr int NG = D / 32;
  constexpr int MC = D / 16;  // value m-tiles (16 channels each)
  const int g = lane >> 2;    // groupID: fragment row / B column
  const int t = lane & 3;     // thread in group: query row of this thread's accumulators
  const int h = unit.kv_head;
  const int stages = a.ring_stages;
  const int slot_bytes = a.ring_slot_bytes;
  const int b0 = s.sink_len + s.to_sink;
  constexpr bool KSYM = KM == kModeSym;
  const int k_tile_bytes = BodyTileBytes(D, KB, s.k.has_zeros != 0);
  auto& ws = sm.w[warp];

  // ---- per unit: the q' operand (B fragments of the score product) and this thread's row terms
  float qmax[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float mx = 0.f;
#pragma unroll
    for (int j = 0; j < D / 32; ++j) mx = fmaxf(mx, fabsf(sm.qn[r][lane * (D / 32) + j]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    qmax[r] = mx;
  }
  uint32_t bq[NG][2];
  {
    const int r = g >> 1;  // B column g = row g / 2, high (even g) or low (odd g) byte
    float qs = 0.f;
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
      if (rr == r) qs = qmax[rr] > 0.f ? kFixedScale / qmax[rr] : 0.f;
#pragma unroll
    for (int gr = 0; gr < NG; ++gr) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t word = 0u;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int k = half * 16 + 4 * t + e;
          const int c = gr * 32 + SlotPhys(KB, k);
          const float x = r < R ? sm.qn[r][c] * qs * (1.f / static_cast<float>(1 << SlotShift(KB, k))) : 0.f;
          word |= FixedByte(x, (g & 1) != 0) << (8 * e);
        }
        bq[gr][half] = word;
      }
    }
  }
  float inv_q = 0.f, qsum[NG];
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
    if (rr == t) inv_q = qmax[rr] > 0.f ? qmax[rr] / kFixedScale : 0.f;
#pragma unroll
  for (int gr = 0; gr < NG; ++gr) {
    qsum[gr] = t < R ? sm.qsum[t][gr] : 0.f;
    if constexpr (KSYM) qsum[gr] *= -static_cast<float>(SymLevels(KB));  // b / a of every group
  }
  // the 4 tokens of this thread's score accumulators (g, g + 8, 16 + g, 24 + g): their value slots
  int pslot[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pslot[i] = SlotOf(VB, g + 8 * i);

  float m = -INFINITY, l = 0.f, acc[MC][2];
#pragma unroll
  for (int mc = 0; mc < MC; ++mc) acc[mc][0] = acc[mc][1] = 0.f;

  auto issue = [&](int tile0, int stage) {
    StageBodyPair<D, KB, VB>(ring + stage * slot_bytes, a, s, h, tile0 - b0, k_tile_bytes, tile0 < unit.tok_end,
                             lane);
  };
  // in the warp's union area: p bytes [8 columns][32 slots], then the tile's (a, b) per key
  // (token, group) and per value channel, computed once per tile by the warp (lane = NG entries)
  uint8_t* pb = reinterpret_cast<uint8_t*>(&ws.u);
  float2* kab = reinterpret_cast<float2*>(pb + 256);  // [32 tokens][NG]
  float2* vab = kab + 32 * NG;                        // [D]
  static_assert(ImmaTileStateBytes(D) <= sizeof(ws.u), "IMMA tile state fits the warp's union");

  float* ka = reinterpret_cast<float*>(kab);  // KSYM: the key groups' a alone, [32 tokens][NG]

  auto tile = [&](const BodySrc& kb, const BodySrc& vb) {
    // (a, b) of the tile's key groups (lane = token) and value channels (lane = NG channels)
    if constexpr (KSYM) {
      TileScales<NG>(kb, lane, ka);
    } else {
      TileAffine<NG, KM>(kb, s.k, KB, lane, kab);
    }
    TileAffine<NG, VM>(vb, s.v, VB, lane, vab);
    __syncwarp();

    // ---- scores of row t for tokens g, g + 8 (m-tile 0) and 16 + g, 24 + g (m-tile 1)
    float sc[4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      float sa[2] = {0.f, 0.f}, sb[2] = {0.f, 0.f};  // tokens tok0 and tok0 + 8
      const int tok0 = mt * 16 + g;
      const uint32_t* kw = reinterpret_cast<const uint32_t*>(kb.codes);
#pragma unroll
      for (int gr = 0; gr < NG; ++gr) {
        uint32_t x0, y0, x1, y1;
        GroupSlotsShared<KB>(kw + (tok0 * NG + gr) * KB, t, x0, y0);
        GroupSlotsShared<KB>(kw + ((tok0 + 8) * NG + gr) * KB, t, x1, y1);
        int c[4] = {0, 0, 0, 0};
        Imma16832(c, x0, x1, y0, y1, bq[gr][0], bq[gr][1]);
        const float v0 = static_cast<float>(c[0] * 256 + c[1]);
        const float v1 = static_cast<float>(c[2] * 256 + c[3]);
        if constexpr (KSYM) {
          const float a0 = ka[tok0 * NG + gr];
          const float a1 = ka[(tok0 + 8) * NG + gr];
          sa[0] += a0 * v0;
          sb[0] += a0 * qsum[gr];
          sa[1] += a1 * v1;
          sb[1] += a1 * qsum[gr];
        } else {
          const float2 ab0 = kab[tok0 * NG + gr];
          const float2 ab1 = kab[(tok0 + 8) * NG + gr];
          sa[0] += ab0.x * v0;
          sb[0] += ab0.y * qsum[gr];
          sa[1] += ab1.x * v1;
          sb[1] += ab1.y * qsum[gr];
        }
      }
      sc[2 * mt] = sa[0] * inv_q + sb[0];
      sc[2 * mt + 1] = sa[1] * inv_q + sb[1];
    }
    // ---- online softmax of row t over the tile (the 8 lanes with this t hold its 32 tokens)
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sc[i] *= a.scale_log2;
      mx = fmaxf(mx, sc[i]);
    }
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_new = fmaxf(m, mx);
    // p relative to the tile's maximum (pt, for the fixed-point operand: the tile keeps 15 bits
    // however far below the running maximum of a long unit it lies) and to the running one
    const float beta = Exp2Ftz(mx - m_new);
    float pt[4], psum = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      pt[i] = Exp2Ftz(sc[i] - mx);
      psum += pt[i] * beta;
    }
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
    const float alpha = Exp2Ftz(m - m_new);  // m = -inf on the first tile: alpha = 0
    l = l * alpha + psum;
    m = m_new;
    if (__any_sync(0xffffffffu, alpha != 1.f)) {  // a row's maximum grew (as in MmaRows::Softmax)
#pragma unroll
      for (int mc = 0; mc < MC; ++mc) {
        acc[mc][0] *= alpha;
        acc[mc][1] *= alpha;
      }
    }
    // ---- p as (high, low) bytes in the value fragment's slot order: pb[column][slot]
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = pslot[i];
      const float x = pt[i] * (kFixedScale / static_cast<float>(1 << SlotShift(VB, k)));
      pb[(2 * t) * 32 + k] = static_cast<uint8_t>(FixedByte(x, false));
      pb[(2 * t + 1) * 32 + k] = static_cast<uint8_t>(FixedByte(x, true));
    }
    __syncwarp();
    const uint32_t pb0 = *reinterpret_cast<const uint32_t*>(pb + g * 32 + 4 * t);
    const uint32_t pb1 = *reinterpret_cast<const uint32_t*>(pb + g * 32 + 16 + 4 * t);
    // ---- P.V: channels mc * 16 + g and + 8 of row t
    const uint32_t* vw = reinterpret_cast<const uint32_t*>(vb.codes);
    const float inv_p = beta * (1.f / kFixedScale);
#pragma unroll
    for (int mc = 0; mc < MC; ++mc) {
      const int c0 = mc * 16 + g;
      uint32_t x0, y0, x1, y1;
      GroupSlotsShared<VB>(vw + c0 * VB, t, x0, y0);
      GroupSlotsShared<VB>(vw + (c0 + 8) * VB, t, x1, y1);
      int c[4] = {0, 0, 0, 0};
      Imma16832(c, x0, x1, y0, y1, pb0, pb1);
      const float v0 = static_cast<float>(c[0] * 256 + c[1]) * inv_p;
      const float v1 = static_cast<float>(c[2] * 256 + c[3]) * inv_p;
      const float2 ab0 = vab[c0];
      const float2 ab1 = vab[c0 + 8];
      // two fused steps into the accumulator (the sum a v + b psum first took a third)
      acc[mc][0] = fmaf(ab0.x, v0, fmaf(ab0.y, psum, acc[mc][0]));
      acc[mc][1] = fmaf(ab1.x, v1, fmaf(ab1.y, psum, acc[mc][1]));
    }
  };
  // (both loops' __syncwarp after a tile: pb and the slot are consumed before the next tile)
  if constexpr (PAGES) {
    PageTiles<D>(a, s, unit, ring, warp, lane, tile);
  } else {
    WarpRingTiles(unit.tok_begin + warp * 32, unit.tok_end, stages, issue, [&](int, int slot) {
      const uint8_t* st = ring + slot * slot_bytes;
      tile(StagedSrc<D>(st, s.k), StagedSrc<D>(st + k_tile_bytes, s.v));
    });
  }

  // ---- this warp's state for the block's epilogue (rows t < R)
  if (t < R) {
    if (g == 0) {
      sm.m[warp][t] = m;
      sm.l[warp][t] = l;
    }
#pragma unroll
    for (int mc = 0; mc < MC; ++mc) {
      ws.u.o[t][mc * 16 + g] = acc[mc][0];
      ws.u.o[t][mc * 16 + g + 8] = acc[mc][1];
    }
  }
}

}  // namespace cuda
}  // namespace kvq
