// For the tests of the CUDA quantizers that must match the reference bit for bit
// (warp_quant_test.cc, lane_quant_test.cc): the reference's result for a group, and groups whose
// results its sequential loop resolves by order or by range.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kvq/quant.h"

namespace kvq {
namespace testing {

// A group's packed words, scale and zero bits (ok false: the quantizer refused the group).
struct QuantOutcome {
  bool ok = false;
  std::vector<uint32_t> words;
  uint16_t scale = 0, zero = 0;
};

// QuantizeGroupRef + PackCodes on x[0 .. n).
inline QuantOutcome QuantReference(const float* x, int n, int bits, QuantMode mode) {
  QuantOutcome o;
  std::vector<uint8_t> codes(static_cast<size_t>(n));
  o.ok = QuantizeGroupRef(x, n, bits, mode, codes.data(), &o.scale, &o.zero);
  o.words.assign(static_cast<size_t>(n * bits / 32), 0u);
  if (o.ok) PackCodes(codes.data(), n, bits, o.words.data());
  return o;
}

// Kinds 0 .. kEdgeKinds - 1: signed zeros, repeated extremes, constants, two-level groups (sym and
// asym reconstruct them equally: the hybrid tie), non-finite inputs, values beyond fp16 range and
// below the minimum scale; kinds 12 .. 14 zeros of random signs as every value, as the minimum and
// as the maximum (the first zero in element order gives a zero extreme's sign).
constexpr int kEdgeKinds = 15;

inline std::vector<float> EdgeGroup(int kind, int n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::bernoulli_distribution zero(0.3), negative(0.5);
  std::vector<float> x(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const bool neg = ((i / 3 + kind) & 1) != 0;
    float v = nd(rng);
    const float z = negative(rng) ? -0.f : 0.f;
    switch (kind) {
      case 0: v = 0.f; break;
      case 1: v = neg ? -0.f : 0.f; break;
      case 2: v = 1.5f; break;
      case 3: v = (i % 5 == 0) ? (neg ? -0.f : 0.f) : std::fabs(v) + 0.25f; break;
      case 4: v = (i % 7 == 2) ? (neg ? -0.f : 0.f) : -std::fabs(v) - 0.25f; break;
      case 5: v = (i % 2) ? 2.f : -2.f; break;
      case 6: v = std::round(v * 2.f) / 2.f; break;  // few distinct values, repeated extremes
      case 7: v = (i == n / 2) ? std::numeric_limits<float>::infinity() : v; break;
      case 8: v = (i == n - 1) ? std::numeric_limits<float>::quiet_NaN() : v; break;
      case 9: v = v * 1e5f; break;    // scales beyond fp16 range
      case 10: v = v * 1e-7f; break;  // below the minimum scale
      case 11: v = (i == 0) ? -std::numeric_limits<float>::infinity() : v; break;
      case 12: v = z; break;
      case 13: v = zero(rng) ? z : std::fabs(v) + 0.25f; break;
      case 14: v = zero(rng) ? z : -std::fabs(v) - 0.25f; break;
      default: break;
    }
    x[size_t(i)] = v;
  }
  return x;
}

}  // namespace testing
}  // namespace kvq
