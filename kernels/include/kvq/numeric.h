// Scalar helpers shared by host and device code: fp16/bf16 conversions with round-to-nearest-even
// and float arithmetic that is never contracted into FMA, so the CPU reference and the CUDA
// kernels compute bit-identical quantization codes.
//
// Every function is defined inline here (KVQ_HD), so device code calls exactly the same code.
// Host builds use -std=c++17 (not gnu++17), so GCC does not contract a*b+c (-ffp-contract=off);
// on the device the *_rn intrinsics forbid contraction explicitly.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#include "kvq/format.h"

namespace kvq {

KVQ_HD uint32_t FloatAsBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

KVQ_HD float BitsAsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

KVQ_HD float HalfBitsToFloat(uint16_t h) {
#if defined(__CUDA_ARCH__)
  // the conversion instruction: exact for every finite value (one instruction instead of the
  // branches and the subnormal loop below, in the quantize-append's instruction-fetch-bound path)
  if ((h & 0x7c00u) != 0x7c00u) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
#endif
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsAsFloat(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return BitsAsFloat(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return BitsAsFloat(sign);  // signed zero
  // Subnormal: mant * 2^-24, exactly representable in fp32.
  int e = 113;  // exponent field of 2^-14
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return BitsAsFloat(sign | (uint32_t(e) << 23) | ((mant & 0x3ffu) << 13));
}

// Round-to-nearest-even, overflow to inf, subnormals exact: bit-identical with __float2half_rn.
KVQ_HD uint16_t FloatToHalfBits(float f) {
  const uint32_t x = FloatAsBits(f);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                  // NaN (canonical, as CUDA)
#if defined(__CUDA_ARCH__)
  // the conversion instruction rounds exactly as the code below (RNE, overflow to inf, exact
  // subnormals): one instruction in the quantize-append's instruction-fetch-bound path
  uint16_t h16;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h16) : "f"(f));
  return h16;
#else
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                // normal fp16 (>= 2^-14)
    const uint32_t e = (a >> 23) - 112;
    const uint32_t m = a & 0x7fffffu;
    uint32_t h = (e << 10) | (m >> 13);
    const uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry into the exponent is right
    return uint16_t(sign | h);
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25 rounds to zero (the tie goes to even 0)
  // Subnormal fp16: value = m * 2^(e-150), unit 2^-24 -> h = m >> (126 - e) with rounding.
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;  // 14 .. 25
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1u))) ++h;  // may become the smallest normal: correct
  return uint16_t(sign | h);
#endif
}

KVQ_HD float Bf16BitsToFloat(uint16_t b) { return BitsAsFloat(uint32_t(b) << 16); }

KVQ_HD uint16_t FloatToBf16Bits(float f) {
  const uint32_t x = FloatAsBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN, sign kept
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);  // RNE; overflow carries into inf
}

KVQ_HD float LoadAct(const uint16_t* p, DType dtype) {
  return dtype == DType::kBF16 ? Bf16BitsToFloat(*p) : HalfBitsToFloat(*p);
}

KVQ_HD uint16_t StoreAct(float f, DType dtype) {
  return dtype == DType::kBF16 ? FloatToBf16Bits(f) : FloatToHalfBits(f);
}

// Uncontracted IEEE round-to-nearest arithmetic.
KVQ_HD float AddRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

KVQ_HD float SubRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

KVQ_HD float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KVQ_HD float DivRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

KVQ_HD float SqrtRn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// Round half to even (the default rounding mode on both sides).
KVQ_HD float Rint(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

KVQ_HD float MinF(float a, float b) { return b < a ? b : a; }
KVQ_HD float MaxF(float a, float b) { return b > a ? b : a; }
KVQ_HD float AbsF(float a) { return BitsAsFloat(FloatAsBits(a) & 0x7fffffffu); }
KVQ_HD bool IsFiniteF(float a) { return (FloatAsBits(a) & 0x7f800000u) != 0x7f800000u; }

}  // namespace kvq
