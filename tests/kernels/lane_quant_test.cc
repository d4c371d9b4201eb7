// The quantize-append's lane quantizer (kernels/cuda/lane_quant.cuh, one thread per group of 32)
// on the CPU: every group must give exactly the packed words, scale and zero of the reference
// (QuantizeGroupRef + PackCodes) and fail exactly where it fails. It multiplies by the reciprocal
// of the scale and divides only near a rounding tie; the groups below put values exactly on and a
// few ulps beside the ties, where the product and the reference's quotient can round to different
// codes. The same source compiles
// into the kernel (FlushLaneGroups); quantize_append_emu_test and the GPU suite check it there.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "quant_cases.h"
#include "kvq/numeric.h"
#include "kvq/quant.h"
#include "lane_quant.cuh"

namespace kvq {
namespace {

using Outcome = testing::QuantOutcome;

std::string Show(const float (&x)[32]) {
  std::string s;
  char buf[32];
  for (float v : x) {
    std::snprintf(buf, sizeof buf, "%a ", v);
    s += buf;
  }
  return s;
}

// How many groups, and how many of them had an element whose product with the reciprocal scale
// lay too near a rounding tie to vouch for its code (so LaneCode divided there).
struct Counts {
  int groups = 0, near_tie = 0;
};

// Whether any element of x comes near a tie under the candidates the reference tries.
bool AnyNearTie(const float (&x)[32], int bits, QuantMode mode) {
  float mn = x[0], mx = x[0], amax = AbsF(x[0]);
  for (float v : x) {
    mn = MinF(mn, v);
    mx = MaxF(mx, v);
    amax = MaxF(amax, AbsF(v));
  }
  bool near = false;
  const auto scan = [&](float s, float z, bool asym) {
    const float r = DivRn(1.f, s);
    for (float v : x) {
      const float q = MulRn(asym ? SubRn(v, z) : v, r);
      near = near || !cuda::RoundsClear(q, Rint(q));
    }
  };
  if (mode != QuantMode::kAsym)
    scan(HalfBitsToFloat(FloatToHalfBits(MaxF(DivRn(amax, float(SymLevels(bits))), kMinScale))), 0.f, false);
  if (mode != QuantMode::kSym)
    scan(HalfBitsToFloat(FloatToHalfBits(MaxF(DivRn(SubRn(mx, mn), float(AsymMaxCode(bits))), kMinScale))),
         HalfBitsToFloat(FloatToHalfBits(mn)), true);
  return near;
}

// Through a strided view (element i at v[i * stride]) as the kernel's shared memory holds them.
template <int kBits>
void ExpectSame(const float (&x)[32], QuantMode mode, Counts* counts) {
  SCOPED_TRACE("bits=" + std::to_string(kBits) + " mode=" + std::to_string(static_cast<int>(mode)) + " x: " + Show(x));
  const Outcome want = testing::QuantReference(x, 32, kBits, mode);
  constexpr int kStride = 3;
  std::vector<float> strided(32 * kStride, std::nanf(""));
  for (int i = 0; i < 32; ++i) strided[size_t(i * kStride)] = x[i];
  std::vector<uint32_t> words(kBits + 1, 0xdeadbeefu);  // every word must be written, none beyond
  uint16_t scale = 0xffffu, zero = 0xffffu;
  const bool ok = cuda::LaneQuantizeGroup32<kBits>(strided.data(), kStride, mode, words.data(), &scale, &zero);
  ASSERT_EQ(ok, want.ok);
  EXPECT_EQ(words[kBits], 0xdeadbeefu) << "a word written beyond the group";
  if (want.ok) {
    EXPECT_EQ(std::vector<uint32_t>(words.begin(), words.begin() + kBits), want.words);
    EXPECT_EQ(scale, want.scale);
    EXPECT_EQ(zero, want.zero);
  } else {
    EXPECT_EQ(words, std::vector<uint32_t>(kBits + 1, 0xdeadbeefu)) << "a failed group wrote words";
  }
  counts->groups++;
  if (want.ok && AnyNearTie(x, kBits, mode)) counts->near_tie++;
}

const QuantMode kModes[] = {QuantMode::kAsym, QuantMode::kSym, QuantMode::kHybrid};

template <typename Fill>
Counts ForAll(int reps, Fill fill) {
  Counts counts;
  std::mt19937 rng(20261207);
  for (int rep = 0; rep < reps; ++rep)
    for (QuantMode mode : kModes)
      for (int bits = 2; bits <= 4; ++bits) {
        float x[32];
        fill(rep, bits, mode, rng, x);
        if (bits == 2) ExpectSame<2>(x, mode, &counts);
        if (bits == 3) ExpectSame<3>(x, mode, &counts);
        if (bits == 4) ExpectSame<4>(x, mode, &counts);
        if (::testing::Test::HasFatalFailure()) return counts;
      }
  return counts;
}

// testing::EdgeGroup's kinds (signed zeros, constants, repeated extremes, non-finite inputs,
// scales beyond fp16 range and below the minimum), each 20 times.
TEST(LaneQuant, EdgeGroupsMatchTheReference) {
  ForAll(testing::kEdgeKinds * 20, [](int rep, int, QuantMode, std::mt19937& rng, float (&x)[32]) {
    const std::vector<float> g = testing::EdgeGroup(rep % testing::kEdgeKinds, 32, rng);
    std::copy(g.begin(), g.end(), x);
  });
}

// Values exactly on the rounding ties: x = (k + 1/2) * s with s the stored scale (fp16, so the
// product is exact in fp32), for both candidates' scales: the reference rounds them half to even,
// the product with the reciprocal scale may land on either side.
TEST(LaneQuant, ExactTiesMatchTheReference) {
  const Counts counts = ForAll(40, [](int rep, int bits, QuantMode mode, std::mt19937& rng, float (&x)[32]) {
    std::uniform_real_distribution<float> mag(-3.f, 3.f);
    const float unit = HalfBitsToFloat(FloatToHalfBits(std::pow(10.f, mag(rng))));  // an fp16 scale
    const int L = SymLevels(bits), qmax = AsymMaxCode(bits);
    std::uniform_int_distribution<int> k_sym(-L, L - 1), k_asym(0, qmax - 1);
    const bool asym = mode == QuantMode::kAsym || (mode == QuantMode::kHybrid && rep % 2);
    for (int i = 0; i < 32; ++i) {
      if (asym) {  // mn = 0 and mx = qmax * unit: scale unit, zero 0
        x[i] = i == 0 ? 0.f : i == 1 ? float(qmax) * unit : (float(k_asym(rng)) + 0.5f) * unit;
      } else {  // max |x| = L * unit: scale unit
        x[i] = i == 0 ? float(L) * unit : (float(k_sym(rng)) + 0.5f) * unit;
      }
    }
  });
  EXPECT_EQ(counts.near_tie, counts.groups) << "a group on the ties did not come near one";
}

// Values one to four ulps beside the ties, where the product and the quotient can fall on either
// side of the half-integer.
TEST(LaneQuant, NearTiesMatchTheReference) {
  const Counts counts = ForAll(200, [](int rep, int bits, QuantMode mode, std::mt19937& rng, float (&x)[32]) {
    std::uniform_real_distribution<float> mag(-3.f, 3.f);
    std::uniform_int_distribution<int> ulps(-4, 4);
    const float unit = HalfBitsToFloat(FloatToHalfBits(std::pow(10.f, mag(rng))));
    const int L = SymLevels(bits), qmax = AsymMaxCode(bits);
    std::uniform_int_distribution<int> k_sym(-L, L - 1), k_asym(0, qmax - 1);
    const bool asym = mode == QuantMode::kAsym || (mode == QuantMode::kHybrid && rep % 2);
    for (int i = 0; i < 32; ++i) {
      float v = asym ? (i == 0 ? 0.f : i == 1 ? float(qmax) * unit : (float(k_asym(rng)) + 0.5f) * unit)
                     : (i == 0 ? float(L) * unit : (float(k_sym(rng)) + 0.5f) * unit);
      if (i > 1) {
        const uint32_t b = FloatAsBits(v);
        v = BitsAsFloat(uint32_t(int64_t(b) + ulps(rng)));
      }
      x[i] = v;
    }
  });
  EXPECT_GT(counts.near_tie, counts.groups / 2);
}

// Ordinary groups: normal values at scales 1e-3 .. 1e3, with and without an offset, a third of them
// rounded to fp16 first (as the window holds them: their ties with fp16 scales are exact ones).
TEST(LaneQuant, RandomGroupsMatchTheReference) {
  const Counts counts = ForAll(2000, [](int rep, int, QuantMode, std::mt19937& rng, float (&x)[32]) {
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> mag(-3.f, 3.f);
    const float s = std::pow(10.f, mag(rng));
    const float shift = rep % 2 ? nd(rng) * s * 4.f : 0.f;
    for (float& v : x) v = nd(rng) * s + shift;
    if (rep % 3 == 0)  // fp16 inputs, as the window holds them
      for (float& v : x) v = HalfBitsToFloat(FloatToHalfBits(v));
  });
  EXPECT_EQ(counts.groups, 2000 * 9);
  EXPECT_GT(counts.near_tie, 0) << "no group came near a tie";
}

}  // namespace
}  // namespace kvq
