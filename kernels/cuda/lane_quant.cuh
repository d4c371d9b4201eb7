// One group of 32 values quantized by one thread (the quantize-append's lane flush,
// FlushLaneGroups): the codes, packed words, scale and zero of QuantizeGroupRef + PackCodes
// (kvq/quant.h) for the same input, in a fraction of the reference's instructions and code bytes.
// That flush runs once every 32 steps on SMs whose instruction cache is cold: straight code of one
// thread per group costs what it takes to fetch it (H100, twenty-third session: the reference's
// code unrolled ~45 us on a (16,32,32,4096) innerq flush step, this quantizer unrolled ~25 us), so
// the passes here are loops over the values in shared memory (x[i * stride]).
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
// - One pass after the extremes instead of three: both candidates' L1 errors (each in element
//   order, as the reference) and both candidates' codes, packed as they come (the loser's words
//   are dropped); codes from the magic-number addition instead of a conversion.
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
#if defined(__CUDACC__)
#define KVQ_UNROLL_4 _Pragma("unroll 4")
#else
#define KVQ_UNROLL_4
#endif
#if !defined(KVQ_NO_UNROLL)  // as warp_quant.cuh defines it
#if defined(__CUDACC__)
#define KVQ_NO_UNROLL _Pragma("unroll 1")
#else
#define KVQ_NO_UNROLL
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

// The extremes: min / max values (fminf / fmaxf on the device, which order -0 below +0; the host
// does the same, so the tests run the same cases). Only the sign of a zero minimum can differ from
// the reference's sequential MinF / MaxF (which keep the first of equal values), and
// LaneQuantizeGroup32 takes that from the first zero; a zero maximum's sign changes nothing (it is
// only subtracted from the minimum, and a zero range gives the minimum scale either way).
KVQ_WARP float LaneMin(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return b < a || (b == a && (FloatAsBits(b) >> 31) != 0u) ? b : a;
#endif
}
KVQ_WARP float LaneMax(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return b > a || (b == a && (FloatAsBits(b) >> 31) == 0u) ? b : a;
#endif
}

// A candidate's scale s, r = RN(1 / s), zero z, code range [lo, hi] and magic = 2^23 + the code's
// offset (L for symmetric codes, 0 for asymmetric ones): c + magic is exact, and its low mantissa
// bits are the stored code.
struct LaneCand {
  float s, r, z, lo, hi, magic;
};

// Where q's code cannot be vouched for: not below 1/2 exactly where RoundsClear(q, c) is false.
KVQ_WARP float LaneTie(float q, float c) { return LaneFma(LaneAbs(q), 0x1p-21f, LaneAbs(SubRn(q, c))); }

// The stored code of value v under candidate k (the low bits of c + magic).
template <int kBits>
KVQ_WARP uint32_t LaneBits(float c, const LaneCand& k) {
  return FloatAsBits(AddRn(c, k.magic)) & ((1u << kBits) - 1u);
}

// Value v's code under one candidate (the symmetric one: kAsym false).
template <int kBits, bool kAsym>
KVQ_WARP uint32_t LaneOne(float v, const LaneCand& k) {
  return LaneBits<kBits>(LaneCode<kAsym>(v, k.s, k.r, k.z, k.lo, k.hi), k);
}

// Value v's codes under both candidates of a hybrid group, each one's L1 error added to its sum
// (called in element order: the reference's sums). One tie test for both: where either product is
// near a tie, both take the reference's divisions. The asymmetric lower clamp is fmaxf's: -0 and +0
// give the same code and the same error magnitude.
template <int kBits>
KVQ_WARP void LaneBoth(float v, const LaneCand& sym, const LaneCand& asym, float& err_sym, float& err_asym,
                       uint32_t& code_sym, uint32_t& code_asym) {
  const float a = SubRn(v, asym.z);
  const float qs = MulRn(v, sym.r), qa = MulRn(a, asym.r);
  float cs = Rint(qs), ca = Rint(qa);
  if (!(LaneMax(LaneTie(qs, cs), LaneTie(qa, ca)) < 0.5f)) {
    cs = Rint(DivRn(v, sym.s));
    ca = Rint(DivRn(a, asym.s));
  }
  cs = MinF(MaxF(cs, sym.lo), sym.hi);
  ca = MinF(LaneMax(ca, 0.f), asym.hi);
  err_sym = AddRn(err_sym, LaneAbs(SubRn(MulRn(cs, sym.s), v)));
  err_asym = AddRn(err_asym, LaneAbs(SubRn(AddRn(MulRn(ca, asym.s), asym.z), v)));
  code_sym = LaneBits<kBits>(cs, sym);
  code_asym = LaneBits<kBits>(ca, asym);
}

// The 32 codes of x[i * stride], packed as PackCodes (code i at bit i * kBits, LSB first) into
// words[0 .. kBits), with codes(v, code_a, code_b) giving each value's code(s) in element order;
// with kTwo a second candidate's words go over x[0 .. kBits) (each word is complete only after the
// value of its index has been read). Where kBits divides 32, one loop iteration per word with the
// codes at compile-time offsets; else a 64-bit accumulator.
template <int kBits, bool kTwo, typename Codes>
KVQ_WARP void LanePackWith(float* x, int stride, uint32_t* words, Codes codes) {
  if constexpr (32 % kBits == 0) {
    constexpr int kPer = 32 / kBits;
    KVQ_NO_UNROLL
    for (int w = 0; w < kBits; ++w) {
      uint32_t wa = 0, wb = 0;
      KVQ_UNROLL
      for (int j = 0; j < kPer; ++j) {
        uint32_t ca = 0, cb = 0;
        codes(x[(w * kPer + j) * stride], ca, cb);
        wa |= ca << (j * kBits);
        if (kTwo) wb |= cb << (j * kBits);
      }
      words[w] = wa;
      if (kTwo) x[w * stride] = BitsAsFloat(wb);
    }
  } else {
    uint64_t acc_a = 0, acc_b = 0;
    int pos = 0, w = 0;
    KVQ_UNROLL_4
    for (int i = 0; i < 32; ++i) {
      uint32_t ca = 0, cb = 0;
      codes(x[i * stride], ca, cb);
      acc_a |= static_cast<uint64_t>(ca) << pos;
      if (kTwo) acc_b |= static_cast<uint64_t>(cb) << pos;
      pos += kBits;
      if (pos >= 32) {
        words[w] = static_cast<uint32_t>(acc_a);
        if (kTwo) x[w * stride] = BitsAsFloat(static_cast<uint32_t>(acc_b));
        ++w;
        acc_a >>= 32;
        acc_b >>= 32;
        pos -= 32;
      }
    }
  }
}

// Quantizes the 32 values x[i * stride] with kBits bits in `mode` into words[0 .. kBits) (the
// 32 * kBits bits of PackCodes), the scale and zero bits, exactly as QuantizeGroupRef + PackCodes;
// false, writing nothing, where the reference returns false (a non-finite input, a scale or zero
// beyond fp16 range). Hybrid groups take one pass for both candidates' errors and codes: the
// symmetric words go to `words`, the asymmetric ones over x[0 .. kBits) (LanePackWith), copied to
// `words` if they win.
template <int kBits>
KVQ_WARP bool LaneQuantizeGroup32(float* x, int stride, QuantMode mode, uint32_t* words, uint16_t* scale_bits,
                                  uint16_t* zero_bits) {
  static_assert(kBits >= 2 && kBits <= 8, "a word completes after its index's value has been read");
  float mn = x[0], mx = x[0], amax = LaneAbs(x[0]);
  float nonfinite = LaneFma(x[0], 0.f, 0.f);
  KVQ_UNROLL_4
  for (int i = 1; i < 32; ++i) {
    const float v = x[i * stride];
    mn = LaneMin(mn, v);
    mx = LaneMax(mx, v);
    amax = LaneMax(amax, LaneAbs(v));
    nonfinite = LaneFma(v, 0.f, nonfinite);
  }
  if (!(nonfinite == 0.f)) return false;  // NaN: some input is inf or NaN
  if (mn == 0.f) {  // the reference's minimum is the first element equal to it: the first zero
    KVQ_NO_UNROLL
    for (int i = 0; i < 32; ++i)
      if (x[i * stride] == 0.f) {
        mn = x[i * stride];
        break;
      }
  }
  const float L = static_cast<float>(SymLevels(kBits));
  const float qmax = static_cast<float>(AsymMaxCode(kBits));

  // the candidates' scales and zero, as the reference computes them
  const uint16_t ss16 = FloatToHalfBits(MaxF(DivRn(amax, L), kMinScale));
  const bool sym_ok = !HalfBitsIsInf(ss16);
  const float ss = HalfBitsToFloat(ss16);
  const LaneCand sym{ss, DivRn(1.f, ss), 0.f, -L, L, AddRn(0x1p23f, L)};
  const float range = SubRn(mx, mn);
  const uint16_t sa16 = FloatToHalfBits(MaxF(DivRn(range, qmax), kMinScale));
  const uint16_t z16 = FloatToHalfBits(mn);
  const bool asym_ok = IsFiniteF(range) && !HalfBitsIsInf(sa16) && !HalfBitsIsInf(z16);
  const float sa = HalfBitsToFloat(sa16);
  const LaneCand asym{sa, DivRn(1.f, sa), HalfBitsToFloat(z16), 0.f, qmax, 0x1p23f};
  bool use_sym = mode == QuantMode::kSym;
  if (mode == QuantMode::kHybrid) {
    if (!sym_ok && !asym_ok) return false;
    // both candidates in one pass (a candidate that is not ok computes garbage and is not used)
    float err_sym = 0.f, err_asym = 0.f;
    LanePackWith<kBits, true>(x, stride, words, [&](float v, uint32_t& cs, uint32_t& ca) {
      LaneBoth<kBits>(v, sym, asym, err_sym, err_asym, cs, ca);
    });
    use_sym = sym_ok && (!asym_ok || err_sym <= err_asym);
    if (!use_sym)
      for (int i = 0; i < kBits; ++i) words[i] = FloatAsBits(x[i * stride]);
  } else {
    if (use_sym ? !sym_ok : !asym_ok) return false;
    if (use_sym) {
      LanePackWith<kBits, false>(x, stride, words,
                                 [&](float v, uint32_t& c, uint32_t&) { c = LaneOne<kBits, false>(v, sym); });
    } else {
      LanePackWith<kBits, false>(x, stride, words,
                                 [&](float v, uint32_t& c, uint32_t&) { c = LaneOne<kBits, true>(v, asym); });
    }
  }
  if (use_sym) {
    *scale_bits = ss16;
    *zero_bits = 0;
  } else {
    *scale_bits = mode == QuantMode::kHybrid ? static_cast<uint16_t>(sa16 | 0x8000u) : sa16;
    *zero_bits = z16;
  }
  return true;
}

}  // namespace cuda
}  // namespace kvq
