// Decode fast path, KIVI body units on the fp16 / bf16 tensor cores (included by decode_mma.cuh).
//
// KIVI groups both tensors along the outer dimension of their product (keys along tokens, values
// along channels), so the codes cannot meet an integer product the way InnerQ's do
// (decode_imma.cuh) without a transposition of the bitstream. Instead each body tile is
// dequantized once per warp into a [32][D] activation tile in shared memory (the layout of the
// fp16 units, decode_mma.cuh), with two codes per instruction: the codes of two channels (keys) or
// two neighbouring channels (values) are moved into the low bits of the two halves of one register
// (PRMT, shift, LOP3), OR-ed with the exponent of 1024 (fp16) or 128 (bf16) so that the half2
// reads 1024 + c exactly, and one HSUB2 + one HFMA2 give a c + b for both. Then the tile runs the
// same mma.m16n8k16 scores / softmax / values as the fp16 preset (MmaRows); the keys' tile and the
// values' tile take turns in one 8 KB (D = 128) work area per warp.
// The dequantized values are rounded to the activation dtype before the products (as the fp16
// preset's are stored), which the GPU tests' error bounds cover.
//
// Units of this kind hold only whole 32-token tiles inside both bodies (as the InnerQ IMMA units;
// the item's sink and windows go to one per-token unit that steps over them). The packed tiles come
// through the warp's cp.async ring, ring_stages - 1 tiles ahead (up to kMaxRingStages: a packed
// 2-bit tile pair is ~3 KB at D = 128, so deep rings are cheap). Bits (K, V): (2, 2) and (4, 4).
#pragma once

namespace kvq {
namespace cuda {

template <DType DT>
__device__ __forceinline__ constexpr uint32_t CodeMagic2() {
  return DT == DType::kF16 ? 0x64006400u : 0x43004300u;  // (1024, 1024) / (128, 128)
}

// x: two codes c0 | c1 << 16 OR-ed with CodeMagic2; returns (a0 c0 + b0, a1 c1 + b1) as two halves.
template <DType DT>
__device__ __forceinline__ uint32_t CodesFma2(uint32_t x, uint32_t a2, uint32_t b2) {
  uint32_t r;
  if constexpr (DT == DType::kF16) {
    const __half2 c = __hsub2(*reinterpret_cast<const __half2*>(&x), __float2half2_rn(1024.f));
    const __half2 v =
        __hfma2(c, *reinterpret_cast<const __half2*>(&a2), *reinterpret_cast<const __half2*>(&b2));
    r = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 c = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&x), __float2bfloat162_rn(128.f));
    const __nv_bfloat162 v = __hfma2(c, *reinterpret_cast<const __nv_bfloat162*>(&a2),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b2));
    r = *reinterpret_cast<const uint32_t*>(&v);
  }
  return r;
}

// The staged along_tokens key tile (codes of channel c: KB words, token j at bit j * KB) as
// activations K[j][c]: lane = D / 32 consecutive channels, one pair of channels per register.
template <int D, DType DT, int KB>
__device__ __forceinline__ void DequantKTokens(const BodySrc& kb, const DevTensor& x, int lane, uint8_t* work) {
  constexpr int CPL = D / 32;
  constexpr int NP = CPL / 2;          // channel pairs per lane
  constexpr int TPW = 32 / KB;         // tokens per word
  constexpr int TPH = TPW / 2;         // tokens per half word
  constexpr uint32_t kMask2 = ((1u << KB) - 1u) * 0x00010001u;
  const int c0 = lane * CPL;
  const uint32_t* kw = reinterpret_cast<const uint32_t*>(kb.codes);
  float sv[CPL], zv[CPL];
  LoadScaleZero<CPL, true>(kb, x, c0, sv, zv);
  uint32_t a2[NP], b2[NP], il[NP][KB][2];
#pragma unroll
  for (int pp = 0; pp < NP; ++pp) {
    const float2 ab0 = GroupAffine(KB, x.mode, sv[2 * pp], zv[2 * pp]);
    const float2 ab1 = GroupAffine(KB, x.mode, sv[2 * pp + 1], zv[2 * pp + 1]);
    a2[pp] = PackAct2<DT>(ab0.x, ab1.x);
    b2[pp] = PackAct2<DT>(ab0.y, ab1.y);
#pragma unroll
    for (int wi = 0; wi < KB; ++wi) {
      const uint32_t w0 = kw[(c0 + 2 * pp) * KB + wi];
      const uint32_t w1 = kw[(c0 + 2 * pp + 1) * KB + wi];
      il[pp][wi][0] = __byte_perm(w0, w1, 0x5410);  // tokens of the word's low half, both channels
      il[pp][wi][1] = __byte_perm(w0, w1, 0x7632);  // and of its high half
    }
  }
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int wi = j / TPW;
    const int hf = (j % TPW) / TPH;
    const int sh = (j % TPH) * KB;
    uint32_t v[NP];
#pragma unroll
    for (int pp = 0; pp < NP; ++pp)
      v[pp] = CodesFma2<DT>(((il[pp][wi][hf] >> sh) & kMask2) | CodeMagic2<DT>(), a2[pp], b2[pp]);
    uint8_t* dst = work + SwzOffset<D>(j, c0 / 8) + (c0 % 8) * 2;
    if constexpr (NP == 2) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(v[0], v[1]);
    } else {
      *reinterpret_cast<uint32_t*>(dst) = v[0];
    }
  }
}

// The staged along_channels value tile (token j's groups: VB words each, channel i of the group at
// bit i * VB) as activations V[j][c]: lane = token, one pair of neighbouring channels per register.
template <int D, DType DT, int VB>
__device__ __forceinline__ void DequantVChannels(const BodySrc& vb, const DevTensor& x, int lane, uint8_t* work) {
  constexpr int NG = D / 32;
  constexpr int CPW = 32 / VB;  // channels per word (16 or 8): 2 or 1 chunks of 16 bytes
  constexpr int PPI = 8 / VB;   // channel pairs per PRMT-ed register
  constexpr uint32_t kEven = VB == 2 ? 0x33333333u : 0x0F0F0F0Fu;  // codes 0, 2, 4, ... of a word
  constexpr uint32_t kMask2 = ((1u << VB) - 1u) * 0x00010001u;
  const uint32_t* vw = reinterpret_cast<const uint32_t*>(vb.codes) + lane * NG * VB;
  float sv[NG], zv[NG];
  LoadScaleZero<NG, true>(vb, x, lane * NG, sv, zv);
#pragma unroll
  for (int gg = 0; gg < NG; ++gg) {
    const float2 ab = GroupAffine(VB, x.mode, sv[gg], zv[gg]);
    const uint32_t a2 = PackAct2<DT>(ab.x, ab.x);
    const uint32_t b2 = PackAct2<DT>(ab.y, ab.y);
#pragma unroll
    for (int wi = 0; wi < VB; ++wi) {
      const uint32_t w = vw[gg * VB + wi];
      const uint32_t ev = w & kEven;          // code 2p at bit 2 p VB
      const uint32_t od = (w >> VB) & kEven;  // code 2p + 1 at bit 2 p VB
      const uint32_t il0 = __byte_perm(ev, od, 0x5410);
      const uint32_t il1 = __byte_perm(ev, od, 0x7632);
      uint32_t v[CPW / 2];
#pragma unroll
      for (int p = 0; p < CPW / 2; ++p) {
        const uint32_t il = p < PPI ? il0 : il1;
        v[p] = CodesFma2<DT>(((il >> ((p % PPI) * 2 * VB)) & kMask2) | CodeMagic2<DT>(), a2, b2);
      }
      const int chunk = (gg * 32 + wi * CPW) / 8;
#pragma unroll
      for (int q = 0; q < CPW / 8; ++q)
        *reinterpret_cast<uint4*>(work + SwzOffset<D>(lane, chunk + q)) =
            make_uint4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    }
  }
}

template <int D, DType DT, int R, int KB, int VB, typename Smem>
__device__ __forceinline__ void MmaKiviBodyUnit(Smem& sm, const AttnArgs& a, const DevSeq& s, const DevUnit& unit,
                                                uint8_t* ring, int warp, int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
  const int h = unit.kv_head;
  const int stages = a.ring_stages;
  const int slot_bytes = a.ring_slot_bytes;
  const int b0 = s.sink_len + s.to_sink;
  const int k_tile_bytes = BodyTileBytes(D, KB, s.k.has_zeros != 0);
  uint8_t* work = ring + stages * slot_bytes;  // [32][D] activations, keys then values

  MmaRows<D, DT, R> st;
  st.Init(sm.qn, sm.pos, g, t);  // body keys are compared with q' (key normalization, when on)

  auto issue = [&](int tile0, int stage) {
    StageBodyPair<D, KB, VB>(ring + stage * slot_bytes, a, s, h, tile0 - b0, k_tile_bytes, tile0 < unit.tok_end,
                             lane);
  };
  WarpRingTiles(unit.tok_begin + warp * 32, unit.tok_end, stages, issue, [&](int tile0, int slot) {
    const uint8_t* stg = ring + slot * slot_bytes;
    DequantKTokens<D, DT, KB>(StagedSrc<D>(stg, s.k), s.k, lane, work);
    __syncwarp();
    float sc[4][4];
    uint32_t pa[2][2];
    st.Scores(work, lane, sc);
    __syncwarp();  // the key tile is read before the values overwrite the work area
    DequantVChannels<D, DT, VB>(StagedSrc<D>(stg + k_tile_bytes, s.v), s.v, lane, work);
    st.Softmax(sc, tile0, unit.tok_end, a.scale_log2, t, pa);
    __syncwarp();
    st.Values(work, lane, pa);
  });
  st.Finish(sm, warp, g, t);
}

}  // namespace cuda
}  // namespace kvq
