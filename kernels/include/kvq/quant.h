// The group quantizers, code packing and key-norm factor of QUANT_FORMATS.md, as header-inline
// KVQ_HD functions: the CPU reference and the CUDA kernels call this very code, so both produce
// identical codes, scales and zeros for identical inputs. The arithmetic order below IS the
// format; change it only together with QUANT_FORMATS.md and kFormatVersion.
//
// Per group of n values x (b bits):
//   asym:   mn, mx in fp32; s = max((mx - mn) / (2^b - 1), 1e-6) -> fp16 s16; z16 = fp16(mn);
//           c = clamp(rint((x - z16) / s16), 0, 2^b - 1);           x^ = c * s16 + z16
//   sym:    L = 2^(b-1) - 1; s = max(max|x| / L, 1e-6) -> fp16 s16;
//           c = clamp(rint(x / s16), -L, L) + L;                    x^ = (c - L) * s16
//   hybrid: both candidates; L1 error summed in element order in fp32; smaller wins, tie -> sym.
//           asym stores -s16 (sign bit set) and z16; sym stores +s16 and zero bits 0.
// Every operation is an uncontracted round-to-nearest fp32 op (numeric.h); rint is half-to-even.
#pragma once

#include <cstdint>

#include "kvq/format.h"
#include "kvq/numeric.h"

namespace kvq {

constexpr int kMaxGroupSize = 128;
constexpr float kMinScale = 1e-6f;

// Largest unsigned code for `bits` (2^b - 1) and the symmetric level count L = 2^(b-1) - 1.
KVQ_HD int AsymMaxCode(int bits) { return (1 << bits) - 1; }
KVQ_HD int SymLevels(int bits) { return (1 << (bits - 1)) - 1; }

KVQ_HD bool HalfBitsIsInf(uint16_t h) { return (h & 0x7fffu) == 0x7c00u; }

// The candidates' stored scale (and zero) bits of a group whose minimum, maximum and largest
// absolute value are mn, mx, amax: the symmetric scale (inf bits where beyond fp16 range), and the
// asymmetric scale and zero with whether both are in range (and the range finite). QuantizeGroupRef
// and the CUDA lane quantizer take them from here; the warp quantizer (warp_quant.cuh) spells the
// same arithmetic out, its kernels' code as measured on the GPU (this form compiles differently
// there).
KVQ_HD uint16_t SymScaleBits(float amax, int bits) {
  return FloatToHalfBits(MaxF(DivRn(amax, float(SymLevels(bits))), kMinScale));
}
KVQ_HD bool AsymScaleZeroBits(float mn, float mx, int bits, uint16_t* sa16, uint16_t* z16) {
  const float range = SubRn(mx, mn);
  *sa16 = FloatToHalfBits(MaxF(DivRn(range, float(AsymMaxCode(bits))), kMinScale));
  *z16 = FloatToHalfBits(mn);
  return IsFiniteF(range) && !HalfBitsIsInf(*sa16) && !HalfBitsIsInf(*z16);
}

// Quantizes one group of n (<= kMaxGroupSize) values with `bits` bits in `mode` (kAsym, kSym,
// kHybrid). Writes unsigned codes [n], the fp16 scale bits (sign bit set = asym, hybrid only) and
// the fp16 zero bits (0 for symmetric). Returns false, writing nothing meaningful, when an input
// is not finite or the chosen scale or zero is beyond fp16 range (the caller reports the error).
KVQ_HD bool QuantizeGroupRef(const float* x, int n, int bits, QuantMode mode, uint8_t* codes,
                             uint16_t* scale_bits, uint16_t* zero_bits) {
  float mn = x[0], mx = x[0], amax = AbsF(x[0]);
  bool finite = IsFiniteF(x[0]);
  for (int i = 1; i < n; ++i) {
    mn = MinF(mn, x[i]);
    mx = MaxF(mx, x[i]);
    amax = MaxF(amax, AbsF(x[i]));
    finite = finite && IsFiniteF(x[i]);
  }
  if (!finite) return false;
  const int qmax = AsymMaxCode(bits);
  const int L = SymLevels(bits);
  const bool try_sym = mode == QuantMode::kSym || mode == QuantMode::kHybrid;
  const bool try_asym = mode == QuantMode::kAsym || mode == QuantMode::kHybrid;

  // Symmetric candidate.
  uint16_t ss16 = 0;
  float ss = 0.f;
  bool sym_ok = false;
  float err_sym = 0.f;
  if (try_sym) {
    ss16 = SymScaleBits(amax, bits);
    sym_ok = !HalfBitsIsInf(ss16);
    ss = HalfBitsToFloat(ss16);
    if (sym_ok && mode == QuantMode::kHybrid) {
      for (int i = 0; i < n; ++i) {
        const float c = MinF(MaxF(Rint(DivRn(x[i], ss)), float(-L)), float(L));
        err_sym = AddRn(err_sym, AbsF(SubRn(MulRn(c, ss), x[i])));
      }
    }
  }
  // Asymmetric candidate.
  uint16_t sa16 = 0, z16 = 0;
  float sa = 0.f, z = 0.f;
  bool asym_ok = false;
  float err_asym = 0.f;
  if (try_asym) {
    asym_ok = AsymScaleZeroBits(mn, mx, bits, &sa16, &z16);
    sa = HalfBitsToFloat(sa16);
    z = HalfBitsToFloat(z16);
    if (asym_ok && mode == QuantMode::kHybrid) {
      for (int i = 0; i < n; ++i) {
        const float c = MinF(MaxF(Rint(DivRn(SubRn(x[i], z), sa)), 0.f), float(qmax));
        err_asym = AddRn(err_asym, AbsF(SubRn(AddRn(MulRn(c, sa), z), x[i])));
      }
    }
  }
  bool use_sym;
  if (mode == QuantMode::kSym) {
    use_sym = true;
  } else if (mode == QuantMode::kAsym) {
    use_sym = false;
  } else {
    use_sym = sym_ok && (!asym_ok || err_sym <= err_asym);
  }
  if (use_sym) {
    if (!sym_ok) return false;
    for (int i = 0; i < n; ++i) {
      const float c = MinF(MaxF(Rint(DivRn(x[i], ss)), float(-L)), float(L));
      codes[i] = uint8_t(int(c) + L);
    }
    *scale_bits = ss16;
    *zero_bits = 0;
    return true;
  }
  if (!asym_ok) return false;
  for (int i = 0; i < n; ++i) {
    const float c = MinF(MaxF(Rint(DivRn(SubRn(x[i], z), sa)), 0.f), float(qmax));
    codes[i] = uint8_t(int(c));
  }
  *scale_bits = mode == QuantMode::kHybrid ? uint16_t(sa16 | 0x8000u) : sa16;
  *zero_bits = z16;
  return true;
}

// Dequantized value of a code under a group's stored scale/zero bits (QUANT_FORMATS.md).
KVQ_HD float DequantRef(uint32_t code, int bits, QuantMode mode, uint16_t scale_bits, uint16_t zero_bits) {
  const bool asym = mode == QuantMode::kAsym || (mode == QuantMode::kHybrid && (scale_bits & 0x8000u));
  if (asym) {
    const float s = HalfBitsToFloat(uint16_t(scale_bits & 0x7fffu));
    return AddRn(MulRn(float(code), s), HalfBitsToFloat(zero_bits));
  }
  return MulRn(float(int(code) - SymLevels(bits)), HalfBitsToFloat(scale_bits));
}

// Bitstream packing of a group's codes: code i at bit i*bits (LSB first, a code may straddle two
// words); `words` has n*bits/32 entries.
KVQ_HD void PackCodes(const uint8_t* codes, int n, int bits, uint32_t* words) {
  const int nw = n * bits / 32;
  for (int w = 0; w < nw; ++w) words[w] = 0;
  const uint32_t mask = (1u << bits) - 1u;
  for (int i = 0; i < n; ++i) {
    const int bit = i * bits;
    const uint32_t c = uint32_t(codes[i]) & mask;
    words[bit >> 5] |= c << (bit & 31);
    if ((bit & 31) + bits > 32) words[(bit >> 5) + 1] |= c >> (32 - (bit & 31));
  }
}

KVQ_HD uint32_t UnpackCode(const uint32_t* words, int i, int bits) {
  const int bit = i * bits;
  const int off = bit & 31;
  uint32_t c = words[bit >> 5] >> off;
  if (off + bits > 32) c |= words[(bit >> 5) + 1] << (32 - off);
  return c & ((1u << bits) - 1u);
}

// InnerQ key-norm factor of one channel from max |k| over the first flushed keys.
KVQ_HD float KeyNormFactor(float max_abs) {
  const float f = SqrtRn(max_abs);
  return f < 1e-6f ? 1.f : f;
}

}  // namespace kvq
