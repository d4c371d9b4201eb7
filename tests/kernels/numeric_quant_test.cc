// numeric.h (fp16/bf16 rounding) and quant.h (quantizers, packing) against independent oracles.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kvq/numeric.h"
#include "kvq/quant.h"

namespace kvq {
namespace {

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Nearest of the two fp16 neighbours (ties to even) computed in double from the half grid.
uint16_t HalfOracle(float f) {
  const double x = f;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(x);
  if (std::isnan(f)) return 0x7fff;
  if (a >= 65520.0) return uint16_t(sign | 0x7c00);
  // Exhaustive search over magnitudes is fine here (binary search on the monotone half grid).
  uint16_t lo = 0, hi = 0x7bff;
  while (lo < hi) {  // largest h with value(h) <= a
    const uint16_t mid = uint16_t((lo + hi + 1) / 2);
    if (double(HalfBitsToFloat(mid)) <= a) lo = mid; else hi = uint16_t(mid - 1);
  }
  const double vlo = HalfBitsToFloat(lo);
  if (vlo == a || lo == 0x7bff) {
    if (lo == 0x7bff && a > vlo) {
      // Between the largest finite half and 65520: rounds down.
    }
    return uint16_t(sign | lo);
  }
  const uint16_t up = uint16_t(lo + 1);
  const double vhi = HalfBitsToFloat(up);
  const double dl = a - vlo, dh = vhi - a;
  if (dl < dh) return uint16_t(sign | lo);
  if (dh < dl) return uint16_t(sign | up);
  return uint16_t(sign | ((lo & 1) ? up : lo));
}

TEST(Numeric, HalfRoundTripEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t b = uint16_t(h);
    if ((b & 0x7c00) == 0x7c00 && (b & 0x3ff)) {
      EXPECT_TRUE(std::isnan(HalfBitsToFloat(b)));
      continue;
    }
    ASSERT_EQ(FloatToHalfBits(HalfBitsToFloat(b)), b) << std::hex << h;
  }
}

TEST(Numeric, HalfRoundingMatchesOracle) {
  std::mt19937_64 rng(11);
  std::vector<float> xs;
  // Every midpoint between neighbours and its float neighbours (normal, subnormal, top end).
  for (uint32_t h = 0; h < 0x7bff; h += 7) {
    const double mid = (double(HalfBitsToFloat(uint16_t(h))) + HalfBitsToFloat(uint16_t(h + 1))) / 2;
    const float m = float(mid);
    xs.push_back(m);
    xs.push_back(std::nextafter(m, 0.f));
    xs.push_back(std::nextafter(m, 1e9f));
  }
  for (float f : {65504.f, 65519.f, 65519.996f, 65520.f, 1e5f, 5.96e-8f, 2.98e-8f, 2.9802322e-8f, 2.9802326e-8f,
                  6.1e-5f, 6.103515625e-05f, 1e-6f, 0.f, 1e-30f})
    xs.push_back(f);
  std::uniform_int_distribution<uint32_t> bits(0, 0xffffffffu);
  for (int i = 0; i < 200000; ++i) {
    const float f = FromBits(bits(rng));
    if (!std::isnan(f)) xs.push_back(f);
    xs.push_back(FromBits((bits(rng) & 0x807fffffu) | (uint32_t(101 + i % 44) << 23)));  // fp16 range
  }
  for (float f : xs) {
    ASSERT_EQ(FloatToHalfBits(f), HalfOracle(f)) << f;
    ASSERT_EQ(FloatToHalfBits(-f), HalfOracle(-f)) << -f;
  }
  EXPECT_EQ(FloatToHalfBits(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToHalfBits(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(FloatToHalfBits(65520.f), 0x7c00);
  EXPECT_EQ(FloatToHalfBits(65519.99f), 0x7bff);
  EXPECT_EQ(FloatToHalfBits(std::nanf("")) & 0x7c00, 0x7c00);
}

#if defined(__FLT16_MAX__) && defined(__x86_64__)
TEST(Numeric, HalfRoundingMatchesCompilerFloat16) {
  std::mt19937_64 rng(12);
  std::uniform_int_distribution<uint32_t> bits(0, 0xffffffffu);
  for (int i = 0; i < 300000; ++i) {
    const float f = FromBits(i % 2 ? bits(rng) : ((bits(rng) & 0x807fffffu) | (uint32_t(100 + i % 46) << 23)));
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t hb;
    std::memcpy(&hb, &h, 2);
    ASSERT_EQ(FloatToHalfBits(f), hb) << f;
  }
}
#endif

TEST(Numeric, Bf16RoundsToNearestEven) {
  std::mt19937_64 rng(13);
  std::uniform_int_distribution<uint32_t> bits(0, 0xffffffffu);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = bits(rng);
    const float f = FromBits(u);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Bf16BitsToFloat(FloatToBf16Bits(f))));
      continue;
    }
    const uint16_t lo = uint16_t(u >> 16);
    const uint16_t got = FloatToBf16Bits(f);
    const uint32_t rem = u & 0xffffu;
    uint16_t want = lo;
    if (rem > 0x8000u || (rem == 0x8000u && (lo & 1))) want = uint16_t(lo + 1);
    ASSERT_EQ(got, want) << std::hex << u;
    if (std::isfinite(f)) {
      // The result is a nearest representable neighbour.
      const double d = std::fabs(double(Bf16BitsToFloat(got)) - f);
      const double d_lo = std::fabs(double(Bf16BitsToFloat(lo)) - f);
      if (std::isfinite(Bf16BitsToFloat(got))) {
        ASSERT_LE(d, d_lo);
      }
    }
  }
  EXPECT_EQ(FloatToBf16Bits(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f818000u)), 0x3f82);  // tie, odd rounds up
}

TEST(Numeric, RintIsHalfToEven) {
  EXPECT_EQ(Rint(0.5f), 0.f);
  EXPECT_EQ(Rint(1.5f), 2.f);
  EXPECT_EQ(Rint(2.5f), 2.f);
  EXPECT_EQ(Rint(-0.5f), 0.f);
  EXPECT_EQ(Rint(-1.5f), -2.f);
  EXPECT_EQ(Rint(2.4999998f), 2.f);
}

TEST(Pack, RoundTripAndBitPositions) {
  std::mt19937_64 rng(21);
  for (int bits : {2, 3, 4, 8}) {
    for (int n : {32, 64, 128}) {
      for (int rep = 0; rep < 20; ++rep) {
        std::vector<uint8_t> codes(static_cast<size_t>(n));
        for (auto& c : codes) c = uint8_t(rng() & ((1u << bits) - 1));
        std::vector<uint32_t> words(size_t(n * bits / 32) + 1, 0xdeadbeefu);
        PackCodes(codes.data(), n, bits, words.data());
        EXPECT_EQ(words.back(), 0xdeadbeefu) << "wrote past the group";
        for (int i = 0; i < n; ++i) ASSERT_EQ(UnpackCode(words.data(), i, bits), codes[size_t(i)]);
        // Bit-by-bit: code i's bit j sits at stream bit i*bits + j, LSB first.
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < bits; ++j) {
            const int bit = i * bits + j;
            ASSERT_EQ((words[size_t(bit / 32)] >> (bit % 32)) & 1u, (codes[size_t(i)] >> j) & 1u);
          }
      }
    }
  }
}

struct Group {
  std::vector<float> x;
  std::vector<uint8_t> codes;
  uint16_t scale = 0, zero = 0;
};

Group Quant(const std::vector<float>& x, int bits, QuantMode mode) {
  Group g;
  g.x = x;
  g.codes.assign(x.size(), 0xff);
  EXPECT_TRUE(QuantizeGroupRef(x.data(), int(x.size()), bits, mode, g.codes.data(), &g.scale, &g.zero));
  return g;
}

std::vector<float> RandomGroup(std::mt19937_64& rng, int n, int kind) {
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(n));
  const float shift = kind == 1 ? 5.f : kind == 2 ? -0.7f : 0.f;
  const float scale = kind == 3 ? 1e-3f : kind == 4 ? 300.f : 1.f;
  for (auto& v : x) v = kind == 5 ? std::fabs(n01(rng)) : n01(rng) * scale + shift;
  if (kind == 6) x[size_t(n / 2)] = 40.f;  // an outlier
  return x;
}

TEST(Quant, ErrorBoundsPerElement) {
  std::mt19937_64 rng(31);
  for (int bits : {2, 3, 4, 8})
    for (int n : {32, 64, 128})
      for (int kind = 0; kind < 7; ++kind)
        for (int rep = 0; rep < 10; ++rep) {
          const std::vector<float> x = RandomGroup(rng, n, kind);
          double mn = x[0], mx = x[0], amax = 0;
          for (float v : x) {
            mn = std::min(mn, double(v));
            mx = std::max(mx, double(v));
            amax = std::max(amax, std::fabs(double(v)));
          }
          // Asymmetric: |x^ - x| <= s16/2 + |mn - z16| + qmax |s - s16| (+ float rounding).
          {
            const Group g = Quant(x, bits, QuantMode::kAsym);
            EXPECT_EQ(g.scale & 0x8000, 0);
            const double s = std::max((mx - mn) / ((1 << bits) - 1), 1e-6);
            const double s16 = HalfBitsToFloat(g.scale), z16 = HalfBitsToFloat(g.zero);
            const double bound = s16 / 2 + std::fabs(mn - z16) + ((1 << bits) - 1) * std::fabs(s - s16) +
                                 1e-6 * (std::fabs(mx) + std::fabs(mn)) + 1e-9;
            for (int i = 0; i < n; ++i) {
              ASSERT_LT(g.codes[size_t(i)], 1 << bits);
              const double xh = DequantRef(g.codes[size_t(i)], bits, QuantMode::kAsym, g.scale, g.zero);
              ASSERT_LE(std::fabs(xh - x[size_t(i)]), bound) << "bits " << bits << " kind " << kind;
            }
          }
          // Symmetric: |x^ - x| <= s16/2 + L |s - s16|.
          {
            const Group g = Quant(x, bits, QuantMode::kSym);
            EXPECT_EQ(g.zero, 0);
            const int L = (1 << (bits - 1)) - 1;
            const double s = std::max(amax / L, 1e-6);
            const double s16 = HalfBitsToFloat(g.scale);
            const double bound = s16 / 2 + L * std::fabs(s - s16) + 1e-6 * amax + 1e-9;
            for (int i = 0; i < n; ++i) {
              ASSERT_LE(g.codes[size_t(i)], 2 * L);
              const double xh = DequantRef(g.codes[size_t(i)], bits, QuantMode::kSym, g.scale, g.zero);
              ASSERT_LE(std::fabs(xh - x[size_t(i)]), bound) << "bits " << bits << " kind " << kind;
            }
          }
        }
}

TEST(Quant, HybridPicksTheSmallerL1Error) {
  std::mt19937_64 rng(32);
  int chose_sym = 0, chose_asym = 0;
  for (int bits : {2, 3, 4})
    for (int kind = 0; kind < 7; ++kind)
      for (int rep = 0; rep < 40; ++rep) {
        const std::vector<float> x = RandomGroup(rng, 32, kind);
        const Group s = Quant(x, bits, QuantMode::kSym);
        const Group a = Quant(x, bits, QuantMode::kAsym);
        const Group h = Quant(x, bits, QuantMode::kHybrid);
        // L1 errors as the spec sums them (fp32, element order) and in double.
        float es = 0, ea = 0;
        double ds = 0, da = 0;
        for (size_t i = 0; i < x.size(); ++i) {
          const float xs = DequantRef(s.codes[i], bits, QuantMode::kSym, s.scale, s.zero);
          const float xa = DequantRef(a.codes[i], bits, QuantMode::kAsym, a.scale, a.zero);
          es = AddRn(es, AbsF(SubRn(xs, x[i])));
          ea = AddRn(ea, AbsF(SubRn(xa, x[i])));
          ds += std::fabs(double(xs) - x[i]);
          da += std::fabs(double(xa) - x[i]);
        }
        if (es <= ea) {
          ++chose_sym;
          EXPECT_EQ(h.scale, s.scale);
          EXPECT_EQ(h.zero, 0);
          EXPECT_EQ(h.codes, s.codes);
          EXPECT_LE(ds, da * (1 + 1e-5) + 1e-6);
        } else {
          ++chose_asym;
          EXPECT_EQ(h.scale, uint16_t(a.scale | 0x8000));
          EXPECT_EQ(h.zero, a.zero);
          EXPECT_EQ(h.codes, a.codes);
          EXPECT_LE(da, ds * (1 + 1e-5) + 1e-6);
        }
        for (size_t i = 0; i < x.size(); ++i) {
          const float want = es <= ea ? DequantRef(s.codes[i], bits, QuantMode::kSym, s.scale, s.zero)
                                      : DequantRef(a.codes[i], bits, QuantMode::kAsym, a.scale, a.zero);
          ASSERT_EQ(DequantRef(h.codes[i], bits, QuantMode::kHybrid, h.scale, h.zero), want);
        }
      }
  // The data mix exercises both choices.
  EXPECT_GT(chose_sym, 50);
  EXPECT_GT(chose_asym, 50);
}

TEST(Quant, ConstantAndZeroGroupsStayFinite) {
  for (int bits : {2, 3, 4, 8})
    for (QuantMode mode : {QuantMode::kAsym, QuantMode::kSym, QuantMode::kHybrid})
      for (float c : {0.f, -0.f, 3.7f, -1234.5f, 1e-7f, 65000.f}) {
        std::vector<float> x(32, c);
        const Group g = Quant(x, bits, mode);
        const double s16 = HalfBitsToFloat(uint16_t(g.scale & 0x7fff));
        EXPECT_GT(s16, 0.0);
        for (size_t i = 0; i < x.size(); ++i) {
          const float xh = DequantRef(g.codes[i], bits, mode, g.scale, g.zero);
          ASSERT_TRUE(std::isfinite(xh));
          EXPECT_LE(std::fabs(double(xh) - c), std::fabs(double(c)) * 1e-3 + 1e-6) << c;
        }
      }
}

TEST(Quant, OutOfRangeAndNonFiniteAreReported) {
  uint8_t codes[32];
  uint16_t s, z;
  std::vector<float> x(32, 1.f);
  x[3] = 1e6f;  // asym zero fine, scale 1e6/3 beyond fp16
  EXPECT_FALSE(QuantizeGroupRef(x.data(), 32, 2, QuantMode::kAsym, codes, &s, &z));
  EXPECT_FALSE(QuantizeGroupRef(x.data(), 32, 2, QuantMode::kSym, codes, &s, &z));
  x[3] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(QuantizeGroupRef(x.data(), 32, 4, QuantMode::kHybrid, codes, &s, &z));
  x[3] = std::nanf("");
  EXPECT_FALSE(QuantizeGroupRef(x.data(), 32, 4, QuantMode::kAsym, codes, &s, &z));
  std::vector<float> y(32, -70000.f);  // zero beyond fp16 range
  EXPECT_FALSE(QuantizeGroupRef(y.data(), 32, 4, QuantMode::kAsym, codes, &s, &z));
  x[3] = 65000.f;  // in range: fine for symmetric 8-bit (s = 65000/127)
  EXPECT_TRUE(QuantizeGroupRef(x.data(), 32, 8, QuantMode::kSym, codes, &s, &z));
}

TEST(Quant, KeyNormIdentity) {
  std::mt19937_64 rng(33);
  std::normal_distribution<float> n01(0.f, 1.f);
  for (int rep = 0; rep < 100; ++rep) {
    double qk = 0, qfkf = 0;
    for (int c = 0; c < 128; ++c) {
      const float q = n01(rng), k = n01(rng) * (1 + c % 9);
      const float f = KeyNormFactor(std::fabs(k) + std::fabs(n01(rng)));
      qk += double(q) * k;
      qfkf += double(MulRn(q, f)) * double(DivRn(k, f));
    }
    EXPECT_NEAR(qk, qfkf, 1e-5 * (1 + std::fabs(qk)));
  }
  EXPECT_EQ(KeyNormFactor(0.f), 1.f);
  EXPECT_EQ(KeyNormFactor(1e-13f), 1.f);
  EXPECT_EQ(KeyNormFactor(4.f), 2.f);
}

}  // namespace
}  // namespace kvq
