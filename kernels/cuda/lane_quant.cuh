// One group of 32 values quantized by one thread (the quantize-append's lane flush,
// FlushLaneGroups): the codes, packed words, scale and zero of QuantizeGroupRef + PackCodes
// (kvq/quant.h) for the same input, in a fraction of the reference's instructions and code bytes.
// That flush runs once every 32 steps on SMs whose instruction cache is cold, where straight code
// of one thread per group costs much of its time in fetching (H100, twenty-third session, the
// quantize-append of a (16,32,32,4096) innerq flush step: the reference's code ~49 us, this
// quantizer unrolled ~31 us, as the loops here over the values in shared memory (x[i * stride])
// ~22 us, though the loops execute more instructions than the unrolled code).
//
// Where the instructions go:
// - No division per element. The reference's code of x is clamp(rint(x / s)) with x / s rounded
//   to nearest; here q = x * RN(1 / s), within 3.0001 * 2^-24 * |q| of x / s and of RN(x / s)
//   (two roundings of 2^-24 each, and RN(x / s)'s own). rint is constant between consecutive
//   half-integers, so where no half-integer lies within 2^-21 * |q| of q both round to the same
//   integer, the sign of a zero included (q, x / s and RN(x / s) have the same sign).
//   `RoundsClear` checks that per element; where it fails (exact ties such as x = 2.5 * s, common
//   with fp16 inputs and fp16 scales: 1-2% of groups have one; or |q| >= 2^20) that element takes
//   the reference's division, in a branch the other elements skip.
// - Two passes after the extremes instead of three: both candidates' L1 errors (each in element
//   order, as the reference) in one, then the chosen one's codes (the same products, so the same
//   codes) packed as they come.
// - One fused multiply-add per element for finiteness (x * 0 is NaN exactly for inf and NaN).
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#include "device_macros.h"
#include "kvq/numeric.h"
#include "kvq/quant.h"

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

// Quantizes the 32 values x[i * stride] with kBits bits in `mode` into words[0 .. kBits) (the
// 32 * kBits bits of PackCodes), the scale and zero bits, exactly as QuantizeGroupRef + PackCodes;
// false, writing nothing, where the reference returns false (a non-finite input, a scale or zero
// beyond fp16 range).
template <int kBits>
KVQ_WARP bool LaneQuantizeGroup32(const float* x, int stride, QuantMode mode, uint32_t* words, uint16_t* scale_bits,
                                  uint16_t* zero_bits) {
  float mn = x[0], mx = x[0], amax = LaneAbs(x[0]);
  float nonfinite = LaneFma(x[0], 0.f, 0.f);
  KVQ_UNROLL_4
  for (int i = 1; i < 32; ++i) {  // the reference's order: the first of equal extremes stays
    const float v = x[i * stride];
    mn = MinF(mn, v);
    mx = MaxF(mx, v);
    amax = MaxF(amax, LaneAbs(v));
    nonfinite = LaneFma(v, 0.f, nonfinite);
  }
  if (!(nonfinite == 0.f)) return false;  // NaN: some input is inf or NaN
  const float lo_sym = -static_cast<float>(SymLevels(kBits)), hi_sym = static_cast<float>(SymLevels(kBits));
  const float qmax = static_cast<float>(AsymMaxCode(kBits));
  const bool hybrid = mode == QuantMode::kHybrid;

  // the candidates' scales and zero, as the reference computes them
  const uint16_t ss16 = SymScaleBits(amax, kBits);
  const bool sym_ok = !HalfBitsIsInf(ss16);
  const float ss = HalfBitsToFloat(ss16), rs = DivRn(1.f, ss);
  uint16_t sa16 = 0, z16 = 0;
  const bool asym_ok = AsymScaleZeroBits(mn, mx, kBits, &sa16, &z16);
  const float sa = HalfBitsToFloat(sa16), z = HalfBitsToFloat(z16), ra = DivRn(1.f, sa);
  bool use_sym = mode == QuantMode::kSym;
  if (hybrid) {  // both errors, each summed in element order (a candidate that is not ok is not used)
    float err_sym = 0.f, err_asym = 0.f;
    KVQ_UNROLL_4
    for (int i = 0; i < 32; ++i) {
      const float v = x[i * stride];
      const float cs = LaneCode<false>(v, ss, rs, 0.f, lo_sym, hi_sym);
      err_sym = AddRn(err_sym, LaneAbs(SubRn(MulRn(cs, ss), v)));
      const float ca = LaneCode<true>(v, sa, ra, z, 0.f, qmax);
      err_asym = AddRn(err_asym, LaneAbs(SubRn(AddRn(MulRn(ca, sa), z), v)));
    }
    use_sym = sym_ok && (!asym_ok || err_sym <= err_asym);
  }
  if (use_sym ? !sym_ok : !asym_ok) return false;
  const float s = use_sym ? ss : sa, r = use_sym ? rs : ra, zz = use_sym ? 0.f : z;
  const float lo = use_sym ? lo_sym : 0.f, hi = use_sym ? hi_sym : qmax;
  const int offset = use_sym ? SymLevels(kBits) : 0;
  // code i at bit i * kBits, LSB first; a word is stored once its 32 bits are in
  uint64_t acc = 0;
  int bits = 0, w = 0;
  KVQ_UNROLL_4
  for (int i = 0; i < 32; ++i) {
    const float v = x[i * stride];
    const float c = LaneCode<true>(v, s, r, zz, lo, hi);  // x - 0 is x, -0 included
    acc |= static_cast<uint64_t>(static_cast<uint32_t>(static_cast<int>(c) + offset)) << bits;
    bits += kBits;
    if (bits >= 32) {
      words[w++] = static_cast<uint32_t>(acc);
      acc >>= 32;
      bits -= 32;
    }
  }
  if (use_sym) {
    *scale_bits = ss16;
    *zero_bits = 0;
  } else {
    *scale_bits = hybrid ? static_cast<uint16_t>(sa16 | 0x8000u) : sa16;
    *zero_bits = z16;
  }
  return true;
}

}  // namespace cuda
}  // namespace kvq
