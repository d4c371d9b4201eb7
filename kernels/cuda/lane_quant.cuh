// One group of 32 values quantized by one thread (the quantize-append's lane flush,
// FlushLaneGroups): the codes, packed words, scale and zero of QuantizeGroupRef + PackCodes
// (kvq/quant.h) for the same input, in a fraction of the reference's instructions. That flush runs
// once every 32 steps on an SM whose instruction cache is cold, as straight code of one thread per
// group, so its time is the instructions it fetches (twenty-second session's trace: ~45 us of a
// (16,32,32,4096) innerq step went to the reference's code there).
//
// Where the instructions go:
// - No division per element. The reference's code of x is clamp(rint(x / s)) with x / s rounded
//   to nearest; here q = x * RN(1 / s), within 3.0001 * 2^-24 * |q| of x / s and of RN(x / s)
//   (two roundings of 2^-24 each, and RN(x / s)'s own). rint is constant between consecutive
//   half-integers, so where no half-integer lies within 2^-21 * |q| of q both round to the same
//   integer, the sign of a zero included (q, x / s and RN(x / s) have the same sign).
//   `RoundsClear` checks that per element; where it fails (exact ties such as x = 2.5 * s, common
//   with fp16 inputs and fp16 scales: ~1% of groups have one; or |q| >= 2^20) that element takes
//   the reference's division, in a branch the other elements skip.
// - Two passes instead of three: the hybrid L1 errors (in element order, as the reference) pick
//   the candidate, then one pass recomputes the chosen one's codes (the same products, so the
//   same codes) and packs them at bit offsets known at compile time (kBits).
// - One fused multiply-add per element for finiteness (x * 0 is NaN exactly for inf and NaN).
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#include "kvq/numeric.h"
#include "kvq/quant.h"

#if !defined(KVQ_WARP)  // as warp_quant.cuh defines them
#if defined(__CUDACC__)
#define KVQ_WARP __device__ __forceinline__
#define KVQ_UNROLL _Pragma("unroll")
#else
#define KVQ_WARP inline
#define KVQ_UNROLL
#endif
#endif

namespace kvq {
namespace cuda {

// a * b + c, one rounding (finiteness and the tie test only: not part of the format's arithmetic).
KVQ_WARP float LaneFma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// |a| with the sign bit cleared, as AbsF; fabsf on the device, so that it folds into the using
// instruction's operand.
KVQ_WARP float LaneAbs(float a) {
#if defined(__CUDA_ARCH__)
  return fabsf(a);
#else
  return AbsF(a);
#endif
}

// Whether no half-integer lies within 2^-21 * |q| of q (c = rint(q)): t = |q - c| + 2^-21 * |q|
// rounded once is below 1/2 only if the exact sum is (rounding is monotonic), and then the nearest
// half-integer is more than 2^-21 * |q| > 3.0001 * 2^-24 * |q| away. |q - c| is exact (c = +-0 for
// |q| < 1/2, Sterbenz above). False for NaN and for |q| >= 2^20.
KVQ_WARP bool RoundsClear(float q, float c) {
  return LaneFma(LaneAbs(q), 0x1p-21f, LaneAbs(SubRn(q, c))) < 0.5f;
}

// The code value (before the +L of symmetric codes) of element x: clamp(rint(a / s), lo, hi) with
// a = x (sym) or x - z (asym), exactly as QuantizeGroupRef; r = RN(1 / s).
template <bool kAsym>
KVQ_WARP float LaneCode(float x, float s, float r, float z, float lo, float hi) {
  const float a = kAsym ? SubRn(x, z) : x;
  const float q = MulRn(a, r);
  float c = Rint(q);
  if (!RoundsClear(q, c)) c = Rint(DivRn(a, s));
  return MinF(MaxF(c, lo), hi);
}

// The L1 error of a candidate, summed in element order (the reference's err_sym / err_asym).
template <bool kAsym>
KVQ_WARP float LaneError(const float (&x)[32], float s, float r, float z, float lo, float hi) {
  float err = 0.f;
  KVQ_UNROLL
  for (int i = 0; i < 32; ++i) {
    const float c = LaneCode<kAsym>(x[i], s, r, z, lo, hi);
    const float back = kAsym ? AddRn(MulRn(c, s), z) : MulRn(c, s);
    err = AddRn(err, LaneAbs(SubRn(back, x[i])));
  }
  return err;
}

// The chosen candidate's codes packed as PackCodes does (code i at bit i * kBits, LSB first).
template <int kBits, bool kAsym>
KVQ_WARP void LanePack(const float (&x)[32], float s, float r, float z, float lo, float hi, int offset,
                       uint32_t (&words)[kBits]) {
  KVQ_UNROLL
  for (int w = 0; w < kBits; ++w) words[w] = 0u;
  KVQ_UNROLL
  for (int i = 0; i < 32; ++i) {
    const uint32_t code = static_cast<uint32_t>(static_cast<int>(LaneCode<kAsym>(x[i], s, r, z, lo, hi)) + offset);
    const int bit = i * kBits;
    words[bit >> 5] |= code << (bit & 31);
    if ((bit & 31) + kBits > 32) words[(bit >> 5) + 1] |= code >> (32 - (bit & 31));
  }
}

// Quantizes x[0..32) with kBits bits in `mode` into `words` (kBits words: 32 * kBits bits), the
// scale and zero bits, exactly as QuantizeGroupRef + PackCodes; false where the reference returns
// false (a non-finite input, a scale or zero beyond fp16 range).
template <int kBits>
KVQ_WARP bool LaneQuantizeGroup32(const float (&x)[32], QuantMode mode, uint32_t (&words)[kBits], uint16_t* scale_bits,
                                  uint16_t* zero_bits) {
  float mn = x[0], mx = x[0], amax = LaneAbs(x[0]);
  float nonfinite = LaneFma(x[0], 0.f, 0.f);
  KVQ_UNROLL
  for (int i = 1; i < 32; ++i) {  // the reference's order: the first of equal extremes stays
    mn = MinF(mn, x[i]);
    mx = MaxF(mx, x[i]);
    amax = MaxF(amax, LaneAbs(x[i]));
    nonfinite = LaneFma(x[i], 0.f, nonfinite);
  }
  if (!(nonfinite == 0.f)) return false;  // NaN: some input is inf or NaN
  const float lo_sym = -static_cast<float>(SymLevels(kBits)), hi_sym = static_cast<float>(SymLevels(kBits));
  const float qmax = static_cast<float>(AsymMaxCode(kBits));
  const bool try_sym = mode == QuantMode::kSym || mode == QuantMode::kHybrid;
  const bool try_asym = mode == QuantMode::kAsym || mode == QuantMode::kHybrid;
  const bool hybrid = mode == QuantMode::kHybrid;

  // the candidates' scales and zero, as the reference computes them
  uint16_t ss16 = 0, sa16 = 0, z16 = 0;
  float ss = 0.f, sa = 0.f, z = 0.f, rs = 0.f, ra = 0.f;
  bool sym_ok = false, asym_ok = false;
  float err_sym = 0.f, err_asym = 0.f;
  if (try_sym) {
    ss16 = FloatToHalfBits(MaxF(DivRn(amax, hi_sym), kMinScale));
    sym_ok = !HalfBitsIsInf(ss16);
    ss = HalfBitsToFloat(ss16);
    rs = DivRn(1.f, ss);
    if (sym_ok && hybrid) err_sym = LaneError<false>(x, ss, rs, 0.f, lo_sym, hi_sym);
  }
  if (try_asym) {
    const float range = SubRn(mx, mn);
    sa16 = FloatToHalfBits(MaxF(DivRn(range, qmax), kMinScale));
    z16 = FloatToHalfBits(mn);
    asym_ok = IsFiniteF(range) && !HalfBitsIsInf(sa16) && !HalfBitsIsInf(z16);
    sa = HalfBitsToFloat(sa16);
    z = HalfBitsToFloat(z16);
    ra = DivRn(1.f, sa);
    if (asym_ok && hybrid) err_asym = LaneError<true>(x, sa, ra, z, 0.f, qmax);
  }
  const bool use_sym = mode == QuantMode::kSym || (hybrid && sym_ok && (!asym_ok || err_sym <= err_asym));
  if (use_sym) {
    if (!sym_ok) return false;
    LanePack<kBits, false>(x, ss, rs, 0.f, lo_sym, hi_sym, SymLevels(kBits), words);
    *scale_bits = ss16;
    *zero_bits = 0;
  } else {
    if (!asym_ok) return false;
    LanePack<kBits, true>(x, sa, ra, z, 0.f, qmax, 0, words);
    *scale_bits = hybrid ? static_cast<uint16_t>(sa16 | 0x8000u) : sa16;
    *zero_bits = z16;
  }
  return true;
}

}  // namespace cuda
}  // namespace kvq
