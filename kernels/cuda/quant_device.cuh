// Device-side group quantizer used by quantize-append. It must produce exactly the codes, scales
// and zeros of the CPU reference; it delegates to the reference's header-inline KVQ_HD functions
// where they exist (see quantize_append.cu).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kvq/format.h"

namespace kvq {
namespace cuda {

__device__ __forceinline__ float Fp16Round(float x, bool* overflow) {
  const __half h = __float2half_rn(x);
  if (__hisinf(h)) *overflow = true;
  return __half2float(h);
}

// Key-norm factor from max |k| of a channel: sqrt, guarded (QUANT_FORMATS.md).
__device__ __forceinline__ float KeyNormFactorDev(float max_abs) {
  const float f = __fsqrt_rn(max_abs);
  return f < 1e-6f ? 1.f : f;
}

// One group of n values, b bits, per QUANT_FORMATS.md: returns false when a scale or zero is
// beyond fp16 range. Uncontracted round-to-nearest arithmetic (no FMA) and rint (half to even).
__device__ __forceinline__ bool QuantizeGroupDev(const float* x, int n, int bits, QuantMode mode,
                                                 uint8_t* codes, uint16_t* scale_bits,
                                                 uint16_t* zero_bits) {
  float mn = x[0], mx = x[0], amax = fabsf(x[0]);
  for (int i = 1; i < n; ++i) {
    mn = fminf(mn, x[i]);
    mx = fmaxf(mx, x[i]);
    amax = fmaxf(amax, fabsf(x[i]));
  }
  bool overflow = false;
  const int qmax = (1 << bits) - 1;
  const int L = (1 << (bits - 1)) - 1;
  // Symmetric candidate.
  float ss = fmaxf(__fdiv_rn(amax, static_cast<float>(L)), 1e-6f);
  // Asymmetric candidate.
  float sa = fmaxf(__fdiv_rn(__fsub_rn(mx, mn), static_cast<float>(qmax)), 1e-6f);
  const bool try_sym = mode == QuantMode::kSym || mode == QuantMode::kHybrid;
  const bool try_asym = mode == QuantMode::kAsym || mode == QuantMode::kHybrid;
  float err_sym = 0.f, err_asym = 0.f;
  if (try_sym) {
    for (int i = 0; i < n; ++i) {
      const float c = fminf(fmaxf(rintf(__fdiv_rn(x[i], ss)), -static_cast<float>(L)), static_cast<float>(L));
      err_sym = __fadd_rn(err_sym, fabsf(__fsub_rn(__fmul_rn(c, ss), x[i])));
    }
  }
  if (try_asym) {
    for (int i = 0; i < n; ++i) {
      const float c = fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x[i], mn), sa)), 0.f), static_cast<float>(qmax));
      err_asym = __fadd_rn(err_asym, fabsf(__fsub_rn(__fadd_rn(__fmul_rn(c, sa), mn), x[i])));
    }
  }
  const bool use_sym = mode == QuantMode::kSym || (mode == QuantMode::kHybrid && err_sym <= err_asym);
  if (use_sym) {
    for (int i = 0; i < n; ++i) {
      const float c = fminf(fmaxf(rintf(__fdiv_rn(x[i], ss)), -static_cast<float>(L)), static_cast<float>(L));
      codes[i] = static_cast<uint8_t>(static_cast<int>(c) + L);
    }
    Fp16Round(ss, &overflow);
    *scale_bits = __half_as_ushort(__float2half_rn(ss));
    *zero_bits = 0;
  } else {
    for (int i = 0; i < n; ++i) {
      const float c = fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x[i], mn), sa)), 0.f), static_cast<float>(qmax));
      codes[i] = static_cast<uint8_t>(c);
    }
    Fp16Round(sa, &overflow);
    Fp16Round(mn, &overflow);
    const float stored = mode == QuantMode::kHybrid ? -sa : sa;
    *scale_bits = __half_as_ushort(__float2half_rn(stored));
    *zero_bits = __half_as_ushort(__float2half_rn(mn));
  }
  return !overflow;
}

// Bitstream packing: code i at bit i * bits; words = n * bits / 32.
__device__ __forceinline__ void PackCodesDev(const uint8_t* codes, int n, int bits, uint32_t* words) {
  const int nw = n * bits / 32;
  for (int w = 0; w < nw; ++w) words[w] = 0;
  for (int i = 0; i < n; ++i) {
    const int bit = i * bits;
    words[bit >> 5] |= static_cast<uint32_t>(codes[i]) << (bit & 31);
    if ((bit & 31) + bits > 32) words[(bit >> 5) + 1] |= static_cast<uint32_t>(codes[i]) >> (32 - (bit & 31));
  }
}

}  // namespace cuda
}  // namespace kvq
