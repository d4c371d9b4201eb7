// Decode fast path, KIVI body units with the packed codes themselves as tensor-core operands
// (included by decode_mma.cuh). An alternative to decode_mma_kivi.cuh, which dequantizes every tile
// into a [32][D] fp16 work area in shared memory: here no tile is dequantized at all.
//
// Transposed products, the tile's tokens (scores) or channels (values) as the M side and the query
// rows as the N side (n = 8 >= R rows, so no half-empty M side):
//   scores  S^T[16 tokens][8 rows]   = C_K[16 tokens][16 channels] x (q' a)^T[16 channels][8 rows]
//   values  O^T[16 channels][8 rows] = C_V^T[16 channels][16 tokens] x (p a)^T[16 tokens][8 rows]
// C_K and C_V are the codes. KIVI groups along the dimension the product does not sum (keys along
// tokens, values along channels), so a group's scale a multiplies the other operand instead:
// q'_c a_c for the keys (the tile is one group per channel), p_t a_(t,g) per channel group g for the
// values. The zeros b enter as products of their own with the zeros as the A side (every row of A
// alike): sum_c b_c q'_c for every token, sum_t b_(t,g) p_t for every channel of group g; their
// products are exact and they accumulate apart from the code products.
//
// Codes as fp16 operands without arithmetic: a code c in bits p..p+B-1 of a half (p + B <= 10) is
// the subnormal c * 2^(p-24), exact, and the tensor cores multiply subnormal fp16 inputs exactly.
// A fragment register holds two codes of neighbouring k (two channels of one token for the keys,
// two tokens of one channel for the values) while a packed word runs along m: PRMT takes the byte
// of each stream that holds the lane's element and one mask leaves both codes where they are in
// their bytes (CodePair::At: 1 instruction per code, no conversion). p is the same for every code
// of a lane's rows, so the code products' accumulators are 2^(p-24) times their value and the
// factor is undone once, when they meet the zero products (per tile for the scores, at the end of
// the unit for the values).
//
// Precision. q' is normalized per row (|q'| <= 1) and rounded to fp16 once per unit; q' a goes in
// as two fp16 operands, the rounded product and its exact residual (HFMA2), so the keys add no
// rounding beyond q''s (rounded q' a alone gave 2-3x the error of fp16 keys: its error scales with
// a c, not with the key). p is rounded to fp16 (as in every fp16 attention) and p a once more: a
// residual there changed nothing measurable on the emulated device, so the values take one product.
// Overflow: |q' a| <= 65504 / 1.5 for any fp16 scale, p a likewise, zeros are fp16 themselves.
//
// The p fragments: the score accumulators (lane = tokens g, g + 8; rows 2t, 2t + 1) are rounded to
// fp16 in pairs and transposed with movmatrix into the B layout of the value product (rows g;
// tokens 2t, 2t + 1), then multiplied by the tokens' scales per channel group.
//
// Units of this kind hold whole 32-token tiles inside both bodies (as the other tensor-core units),
// fed through the warp's cp.async ring; the value codes are staged with 32 bytes of padding per
// 128 (kKiviVPad) so that the lanes' 8-byte reads of 4 tokens hit different banks. KIVI asym groups (the
// presets) in both tensors, (K, V) bits (2, 2) or (4, 4); fp16 and bf16 batches (the products are
// fp16 either way: codes, normalized q' and p, fp16 scales and zeros).
#pragma once

namespace kvq {
namespace cuda {

__device__ __forceinline__ uint32_t MovMatrixTrans(uint32_t x) {
#if defined(KVQ_CUDA_EMU)
  return kvq_emu::MovMatrixTrans(x);
#else
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
#endif
}

// x |y| per half. The stored scales' sign bit is the hybrid mode's flag (QUANT_FORMATS.md); an
// asymmetric scale is used as |s| like the reference's GroupAffine does, and |.| is an operand
// modifier of HMUL2 / HFMA2 (no instruction of its own, where clearing the bit took a LOP3).
__device__ __forceinline__ uint32_t HMul2Abs(uint32_t x, uint32_t y) {
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&x), __habs2(*reinterpret_cast<const __half2*>(&y)));
  return *reinterpret_cast<const uint32_t*>(&r);
}
// x |y| - hi per half, hi = HMul2Abs(x, y): the product's rounding residual (exact unless it is
// subnormal).
__device__ __forceinline__ uint32_t HFmaResidual2Abs(uint32_t x, uint32_t y, uint32_t hi) {
  const __half2 r = __hfma2(*reinterpret_cast<const __half2*>(&x), __habs2(*reinterpret_cast<const __half2*>(&y)),
                            __hneg2(*reinterpret_cast<const __half2*>(&hi)));
  return *reinterpret_cast<const uint32_t*>(&r);
}
// A fragment register whose value does not matter (the rows g + 8 of a product whose A rows are
// all alike, whose results are never read): no instruction defines it, so the register allocator
// puts the defined operands where the fragment wants them instead of copying them there. The
// emulated device gets a zero (its C++ must not read an indeterminate value).
__device__ __forceinline__ uint32_t UnusedFragment() {
#if defined(KVQ_CUDA_EMU)
  return 0u;
#else
  uint32_t r;
  asm volatile("" : "=r"(r));
  return r;
#endif
}

// Where elements g and g + 8 of a 16-element run of B-bit codes lie for lane groupID g: the run's
// words (B / 2 of them); PRMT moves the byte holding the element, from each stream, into bytes 0
// and 2 (a per-lane selector), and one mask keeps the element's bits there. The code is left at its
// position p within the byte (2 (g % 4) for 2 bits, 4 (g % 2) for 4), i.e. the half is the
// subnormal c 2^(p - 24), still exact (p + B <= 8 < 10 mantissa bits); every code this lane places
// in a row of A has the same p (elements g and g + 8 share it), so the products' accumulators of
// the lane's rows g and g + 8 are 2^(p - 24) times their value and `unscale` = 2^(24 - p) undoes
// it where they meet the zero products. (One PRMT and one LOP3 per register of two codes; a shift
// to bit 0 would add a third.)
template <int B>
struct CodePair {
  static_assert(B == 2 || B == 4, "2- or 4-bit codes");
  static constexpr int kWordB = B == 2 ? 0 : 1;  // word of element g + 8 (element g: word 0)
  uint32_t sel_a, sel_b;                         // PRMT selectors of elements g and g + 8
  uint32_t mask;                                 // the element's bits in bytes 0 and 2
  float unscale;                                 // 2^(24 - p)
  __device__ __forceinline__ explicit CodePair(int g) {
    // output bytes 0, 1 from byte b of the first stream, 2, 3 from byte b of the second
    auto sel = [](uint32_t b) { return b | (b << 4) | ((4u + b) << 8) | ((4u + b) << 12); };
    uint32_t pos;
    if constexpr (B == 2) {  // g at bit 2g, g + 8 at bit 2g + 16 of the one word
      sel_a = sel(static_cast<uint32_t>(g) >> 2);
      sel_b = sel(2u + (static_cast<uint32_t>(g) >> 2));
      pos = 2u * (g & 3);
    } else {  // g at bit 4g of word 0, g + 8 at bit 4g of word 1
      sel_a = sel_b = sel(static_cast<uint32_t>(g) >> 1);
      pos = 4u * (g & 1);
    }
    mask = (((1u << B) - 1u) * 0x00010001u) << pos;
    unscale = 16777216.f / static_cast<float>(1u << pos);
  }
  // Two codes as fp16 subnormals: (x's, y's) element at the position the selector names.
  __device__ __forceinline__ uint32_t At(uint32_t x, uint32_t y, uint32_t sel) const {
    return __byte_perm(x, y, sel) & mask;
  }
};

// The query side of the key product, once per unit: lane (g, t) holds row g's q' / max |q'_g| as
// fp16 pairs for channels 16 kc + 4t, + 1 (reg 0: k = 2t, 2t + 1 of the product's k-step) and
// 16 kc + 4t + 2, + 3 (reg 1: k = 2t + 8, 2t + 9), so that a lane's 4 channels are contiguous in the
// tile (one 8-byte scale read, their code words in one run); kept in the warp's shared
// memory ([kc / 2][lane] uint4, read back per tile: registers are the scarcer resource), and the
// normalizers of rows 2t, 2t + 1 (its score accumulators' rows).
template <int D, int R, typename Smem>
__device__ __forceinline__ void KiviCodesQuery(const Smem& sm, uint4* qf, int g, int t, float (&row_norm)[2]) {
  constexpr int KS = D / 16;
  float mx = 0.f;
  if (g < R) {
#pragma unroll
    for (int kc = 0; kc < KS; ++kc) {
      const int c = kc * 16 + 4 * t;
      mx = fmaxf(mx, fmaxf(fmaxf(fabsf(sm.qn[g][c]), fabsf(sm.qn[g][c + 1])),
                           fmaxf(fabsf(sm.qn[g][c + 2]), fabsf(sm.qn[g][c + 3]))));
    }
  }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float inv = mx > 0.f ? 1.f / mx : 0.f;
  const int lane = 4 * g + t;
#pragma unroll
  for (int kp = 0; kp < KS / 2; ++kp) {
    uint32_t r[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = (2 * kp + j) * 16 + 4 * t;
      const int gr = g < R ? g : 0;
      r[2 * j] = g < R ? PackAct2<DType::kF16>(sm.qn[gr][c] * inv, sm.qn[gr][c + 1] * inv) : 0u;
      r[2 * j + 1] = g < R ? PackAct2<DType::kF16>(sm.qn[gr][c + 2] * inv, sm.qn[gr][c + 3] * inv) : 0u;
    }
    qf[kp * 32 + lane] = make_uint4(r[0], r[1], r[2], r[3]);
  }
  row_norm[0] = __shfl_sync(0xffffffffu, mx, 8 * t);      // row 2t: lane (g = 2t, 0)
  row_norm[1] = __shfl_sync(0xffffffffu, mx, 8 * t + 4);  // row 2t + 1
}

// Where a KIVI code unit's body tile starts (BodyTileSrc for the tensors these units are given: the
// plan's KIVI shape, K along tokens, V along channels, groups of 32, B bits, laid out as
// KiviCodesLayout says): tile j = (u0 % kPageTokens) / 32 of its page has its codes at j 4 D B bytes
// from the head's start, its scales at KiviHeadScalesOffset + j 2 D and its zeros 8 D further, in
// either grouping. Two pointers per tensor (this lane's 16 bytes of the codes and of the scales);
// every other offset is a constant. u0 >= 0: unsigned, no signed-division fix-ups.
template <int D, int B>
struct KiviTilePtrs {
  const uint8_t* codes;  // + 16 lane
  const uint8_t* sz;     // scales + 16 lane; the zeros at + kZeros
  static constexpr int kZeros = 8 * D;
};
template <int D, int B>
__device__ __forceinline__ KiviTilePtrs<D, B> KiviTileSrc(const AttnArgs& a, const DevTensor& x, int h, unsigned u0,
                                                         int lane) {
  const uint8_t* head = a.arena + a.pages[x.body_pages + static_cast<int>(u0 / kPageTokens)] +
                        static_cast<unsigned>(h) * static_cast<unsigned>(KiviHeadBytes(D, B)) + lane * 16;
  const unsigned j = u0 % kPageTokens / 32;
  return {head + j * (4 * D * B), head + KiviHeadScalesOffset(D, B) + j * (2 * D)};
}

// Warp-wide copy of one KIVI tile pair into a ring slot: the K tile as stored, the V tile's codes
// with 16 bytes of padding after every 128, then its scales and zeros; one commit group. Sizes are
// compile-time (B-bit codes: 4 D B bytes per tile, a multiple of 512), so the copies unroll.
template <int D, int B>
__device__ __forceinline__ void KiviCodesStage(uint8_t* dst, const AttnArgs& a, const DevSeq& s, int h, int u0,
                                               bool valid, int lane) {
  constexpr int kCodes = 4 * D * B;
  static_assert(kCodes % 512 == 0, "whole warp-wide copies");
  if (valid) {
    const KiviTilePtrs<D, B> ks = KiviTileSrc<D, B>(a, s.k, h, static_cast<unsigned>(u0), lane);
    const KiviTilePtrs<D, B> vs = KiviTileSrc<D, B>(a, s.v, h, static_cast<unsigned>(u0), lane);
    constexpr int kZ = KiviTilePtrs<D, B>::kZeros;
    uint8_t* v = dst + kCodes + 4 * D;
    // step `it` copies bytes i = 512 it + 16 lane; the V codes land at i + (i / 128) kKiviVPad =
    // (16 lane + (lane / 8) kKiviVPad) + (512 + 4 kKiviVPad) it. Per-lane pointers, the steps'
    // offsets as the copies' immediates.
    uint8_t* kd = dst + lane * 16;
    uint8_t* vd = v + lane * 16 + (lane >> 3) * kKiviVPad;
    CpAsync16Run<kCodes / 512, 512, 512>(kd, ks.codes);
    CpAsync16Run<kCodes / 512, 512 + 4 * kKiviVPad, 512>(vd, vs.codes);
    if (lane * 16 < 2 * D) {
      uint8_t* vsz = v + KiviCodesPad(kCodes) + lane * 16;
      CpAsync16At<kCodes, 0>(kd, ks.sz);
      CpAsync16At<kCodes + 2 * D, kZ>(kd, ks.sz);
      CpAsync16(vsz, vs.sz);
      CpAsync16At<2 * D, kZ>(vsz, vs.sz);
    }
  }
  CpAsyncCommit();
}

// Words w of B-bit codes starting at p: B / 2 words per 16 codes, N of them.
template <int N>
__device__ __forceinline__ void LoadSharedWords(const uint8_t* p, uint32_t* w) {
  if constexpr (N == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else {
    static_assert(N == 2, "2 or 4 words");
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  }
}

template <int D, int R, int B, typename Smem>
__device__ __forceinline__ void KiviCodesBodyUnit(Smem& sm, const AttnArgs& a, const DevSeq& s, const DevUnit& unit,
                                                  uint8_t* ring, int warp, int lane) {
  static_assert(R <= 8, "the query rows are the N side of 8");
  constexpr int KS = D / 16;   // k-steps of the key product (16 channels)
  constexpr int MC = D / 16;   // m-tiles of the value product (16 channels)
  constexpr int NG = D / 32;   // channel groups of the values
  constexpr int WPC = B;       // words per channel of a key tile (32 tokens)
  constexpr int WPT = NG * B;  // words per token of a value tile
  const int g = lane >> 2;
  const int t = lane & 3;
  const int h = unit.kv_head;
  const int stages = a.ring_stages;
  const int slot_bytes = a.ring_slot_bytes;
  const int b0 = s.sink_len + s.to_sink;
  constexpr int kKCodes = 4 * D * B;
  constexpr int kVCodes = 4 * D * B;
  const CodePair<B> cp(g);

  auto& ws = sm.w[warp];
  uint4* qf = reinterpret_cast<uint4*>(&ws.u);
  static_assert(sizeof(ws.u) >= D / 32 * 32 * sizeof(uint4), "the query fragments fit the warp's union");
  float row_norm[2];
  KiviCodesQuery<D, R>(sm, qf, g, t, row_norm);
  __syncwarp();
  int pos[2];
  float fac[2], m[2], l[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = 2 * t + i;
    pos[i] = row < R ? sm.pos[row] : -1;
    fac[i] = row_norm[i] * a.scale_log2;
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  const int pos_lo = sm.pos[0];  // the unit's first row: the smallest position
  float o[MC][4];   // 2^-24 x the code products (channels 16 mc + g, + 8; rows 2t, 2t + 1)
  float oz[NG][4];  // the zero products per group (every channel of the group alike: [0], [1] are read)
#pragma unroll
  for (int mc = 0; mc < MC; ++mc) o[mc][0] = o[mc][1] = o[mc][2] = o[mc][3] = 0.f;
#pragma unroll
  for (int gg = 0; gg < NG; ++gg) oz[gg][0] = oz[gg][1] = oz[gg][2] = oz[gg][3] = 0.f;

  // padded value-code rows (KiviCodesStage): token j at j TB + (j TB / 128) kKiviVPad; a multiple of 8
  // tokens adds a multiple of 128 bytes, so rows 16 mt + 8 hh + 2t + e split into a compile-time
  // part and this lane's part
  constexpr int TB = 4 * WPT;
  auto VRowOffset = [](int j) { return j * TB + (j * TB >> 7) * kKiviVPad; };
  const int vrow_off[2] = {VRowOffset(2 * t), VRowOffset(2 * t + 1)};

  auto issue = [&](int tile0, int stage) {
    KiviCodesStage<D, B>(ring + stage * slot_bytes, a, s, h, tile0 - b0, tile0 < unit.tok_end, lane);
  };
  WarpRingTiles(unit.tok_begin + warp * 32, unit.tok_end, stages, issue, [&](int tile0, int slot) {
    const uint8_t* kt = ring + slot * slot_bytes;
    const uint8_t* ksc = kt + kKCodes;
    const uint8_t* kz = ksc + 2 * D;
    const uint8_t* vt = kz + 2 * D;
    const uint8_t* vsc = vt + KiviCodesPad(kVCodes);
    const uint8_t* vz = vsc + 2 * D;
    const uint8_t* vsc_t = vsc + 2 * NG * 2 * t;  // token 2t's group scales
    const uint8_t* vz_t = vz + 2 * NG * 2 * t;
    const uint8_t* vrow[2] = {vt + vrow_off[0], vt + vrow_off[1]};  // tokens 2t, 2t + 1

    // ---- scores: S^T = C_K (q' a)^T + B_K q'^T. q' a enters as two fp16 operands, the rounded
    // product and its residual (HFMA2 computes q' a - hi exactly before rounding): together they
    // hold q' a exactly, so the keys' only rounding is that of q' (as with fp16 keys).
    float zc[4] = {0.f, 0.f, 0.f, 0.f};
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kp = 0; kp < KS / 2; ++kp) {
      const uint4 q4 = qf[kp * 32 + lane];
      const uint32_t qv[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int kc = 2 * kp + j;
        const uint2 s01 = *reinterpret_cast<const uint2*>(ksc + 2 * (kc * 16 + 4 * t));  // channels 4t .. 4t + 3
        const uint32_t* z01 = reinterpret_cast<const uint32_t*>(kz + 2 * (kc * 16 + 4 * t));
        const uint32_t b0 = HMul2Abs(qv[2 * j], s01.x), b1 = HMul2Abs(qv[2 * j + 1], s01.y);
        const uint32_t r0 = HFmaResidual2Abs(qv[2 * j], s01.x, b0), r1 = HFmaResidual2Abs(qv[2 * j + 1], s01.y, b1);
        // the zero term with the zeros as the A side (every token row alike): exact products, read
        // from the accumulators of row g alone (zc[0], zc[1]); rows g + 8 take no operands of their
        // own, so each zero word is loaded straight into its fragment register
        MmaF16<DType::kF16>(zc, z01[0], UnusedFragment(), z01[1], UnusedFragment(), qv[2 * j], qv[2 * j + 1]);
        uint32_t w[4 * WPC];  // channels 16 kc + 4t + i, i < 4: all their words (channel i at i * WPC)
        const uint8_t* src = kt + 4 * WPC * (kc * 16 + 4 * t);
        LoadSharedWords<4>(src, w);
        LoadSharedWords<4>(src + 16, w + 4);
        if constexpr (WPC == 4) {
          LoadSharedWords<4>(src + 32, w + 8);
          LoadSharedWords<4>(src + 48, w + 12);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int wa = mt * B / 2, wb = wa + CodePair<B>::kWordB;
          const uint32_t c0 = cp.At(w[wa], w[WPC + wa], cp.sel_a), c1 = cp.At(w[wb], w[WPC + wb], cp.sel_b);
          const uint32_t c2 = cp.At(w[2 * WPC + wa], w[3 * WPC + wa], cp.sel_a);
          const uint32_t c3 = cp.At(w[2 * WPC + wb], w[3 * WPC + wb], cp.sel_b);
          MmaF16<DType::kF16>(sc[mt], c0, c1, c2, c3, b0, b1);
          MmaF16<DType::kF16>(sc[mt], c0, c1, c2, c3, r0, r1);
        }
      }
    }

    // ---- online softmax per row (rows 2t, 2t + 1; tokens g, g + 8 of both halves). A tile below
    // every row's position (all but the last tiles of a step with several new tokens) needs no
    // per-token test: rows >= R then see finite scores (q' and the factor are 0) whose p stay in
    // their own columns of the products and are never written out.
    float x[2][4];  // [row i][2 mt + hh]: token 16 mt + 8 hh + g of the tile
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) x[i][2 * mt + hh] = fmaf(sc[mt][2 * hh + i], cp.unscale, zc[i]) * fac[i];
    if (!(tile0 + 32 <= pos_lo + 1)) {  // warp-uniform: the tile reaches the unit's end or a row's position
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        // a token is seen by row i where tok < tok_end and tok <= pos[i]: offset g + 16 mt + 8 hh <= lim
        const int lim = min(unit.tok_end - 1, pos[i]) - tile0 - g;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (16 * (j >> 1) + 8 * (j & 1) > lim) x[i][j] = -INFINITY;
      }
    }
    float p[2][4];
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = fmaxf(fmaxf(x[i][0], x[i][1]), fmaxf(x[i][2], x[i][3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(m[i], mx);
      alpha[i] = m[i] == -INFINITY ? 0.f : Exp2Ftz(m[i] - m_new);
      float ps = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float pj = m_new == -INFINITY ? 0.f : Exp2Ftz(x[i][j] - m_new);
        p[j >> 1][2 * (j & 1) + i] = pj;  // p[mt][2 hh + i], the accumulator layout
        ps += pj;
      }
      l[i] = l[i] * alpha[i] + ps;
      m[i] = m_new;
    }
    // the accumulators change scale only when a row's maximum grew (alpha != 1): late in a long
    // unit most tiles leave every row's maximum where it was, and the warp skips the 48 multiplies
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int mc = 0; mc < MC; ++mc) {
        o[mc][0] *= alpha[0];
        o[mc][1] *= alpha[1];
        o[mc][2] *= alpha[0];
        o[mc][3] *= alpha[1];
      }
#pragma unroll
      for (int gg = 0; gg < NG; ++gg) {  // rows g only: oz[gg][2], [3] are never read
        oz[gg][0] *= alpha[0];
        oz[gg][1] *= alpha[1];
      }
    }
    // P^T fragments: k-step mt = tokens 16 mt .. + 15; reg hh = tokens 16 mt + 8 hh + 2t, + 1 of row g
    uint32_t pt[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        pt[mt][hh] = MovMatrixTrans(PackAct2<DType::kF16>(p[mt][2 * hh], p[mt][2 * hh + 1]));

    // ---- values: O^T += C_V^T (p a)^T + B_V^T p^T, per channel group
    // the 8 tokens of this lane's B fragments are 16 mt + 8 hh + 2t + e; per pair of groups, their
    // scales and zeros (one 32-bit word each: the two groups' halves)
#pragma unroll
    for (int gg = 0; gg < NG; ++gg) {
      const uint32_t sel = (gg & 1) ? 0x7632u : 0x5410u;
      uint32_t bv[2][2], zt[2][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // tokens j = 16 mt + 8 hh + 2t and j + 1: the 32-bit words holding groups gg & ~1, gg | 1
          const int o0 = 2 * NG * (16 * mt + 8 * hh) + 4 * (gg / 2);
          const uint32_t a2 = __byte_perm(*reinterpret_cast<const uint32_t*>(vsc_t + o0),
                                          *reinterpret_cast<const uint32_t*>(vsc_t + o0 + 2 * NG), sel);
          const uint32_t z2 = __byte_perm(*reinterpret_cast<const uint32_t*>(vz_t + o0),
                                          *reinterpret_cast<const uint32_t*>(vz_t + o0 + 2 * NG), sel);
          bv[mt][hh] = HMul2Abs(pt[mt][hh], a2);
          zt[mt][hh] = z2;
        }
      // the zero term with the tokens' zeros as the A side (every channel row alike): exact products,
      // rows (channels) g alone (oz[gg][0], [1]; rows g + 8 would be the same)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        MmaF16<DType::kF16>(oz[gg], zt[mt][0], UnusedFragment(), zt[mt][1], UnusedFragment(), pt[mt][0], pt[mt][1]);
      // the group's words of the 8 tokens: B words per token
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t w[2][2][B];  // [hh][e][word]
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            LoadSharedWords<B>(vrow[e] + VRowOffset(16 * mt + 8 * hh) + gg * 4 * B, w[hh][e]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // m-tile 2 gg + r: channels 32 gg + 16 r + (g, g + 8)
          const int wa = r * B / 2, wb = wa + CodePair<B>::kWordB;
          float(&acc)[4] = o[2 * gg + r];
          MmaF16<DType::kF16>(acc, cp.At(w[0][0][wa], w[0][1][wa], cp.sel_a), cp.At(w[0][0][wb], w[0][1][wb], cp.sel_b),
                              cp.At(w[1][0][wa], w[1][1][wa], cp.sel_a), cp.At(w[1][0][wb], w[1][1][wb], cp.sel_b),
                              bv[mt][0], bv[mt][1]);
        }
      }
    }
  });

  // ---- this warp's state for the block's epilogue: l summed over the 8 lanes of a row pair
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 4);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 8);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 16);
  }
  __syncwarp();  // the query fragments in ws.u are read before the accumulators overwrite them
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = 2 * t + i;
    if (row < R) {
      if (g == 0) {
        sm.m[warp][row] = m[i];
        sm.l[warp][row] = l[i];
      }
#pragma unroll
      for (int mc = 0; mc < MC; ++mc) {
        ws.u.o[row][16 * mc + g] = fmaf(o[mc][i], cp.unscale, oz[mc / 2][i]);
        ws.u.o[row][16 * mc + g + 8] = fmaf(o[mc][2 + i], cp.unscale, oz[mc / 2][i]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace kvq
