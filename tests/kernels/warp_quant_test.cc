// The CUDA quantize-append's warp quantizer (kernels/cuda/warp_quant.cuh) run on the CPU: 32
// threads play the 32 lanes of a warp, the warp operations exchange values through a barrier,
// and every group must give exactly the codes, packed words, scale and zero of the reference
// (QuantizeGroupRef + PackCodes), and fail exactly where the reference fails. The same source
// compiles into the kernel, so this checks its arithmetic and its reductions without a GPU;
// the GPU suite (QuantizeEdgeValues and every preset test) checks the kernel around it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "quant_cases.h"
#include "kvq/quant.h"
#include "warp_emu.h"
#include "warp_quant.cuh"

namespace kvq {
namespace {

using Outcome = testing::QuantOutcome;

template <int J, bool kSumsBy4>
Outcome OnWarp(const std::vector<float>& x, int bits, QuantMode mode) {
  Outcome o;
  o.words.assign(32 * J * bits / 32, 0u);
  std::vector<float> err(2 * 32 * J, std::numeric_limits<float>::quiet_NaN());
  bool ok[32];
  uint16_t sc[32], zr[32];
  cuda::warp::RunWarp([&](int lane) {
    float v[J];
    for (int j = 0; j < J; ++j) v[j] = x[size_t(j * 32 + lane)];
    uint32_t code[J];
    ok[lane] = cuda::WarpQuantizeGroup<J, kSumsBy4>(v, bits, mode, err.data(), lane, code, &sc[lane], &zr[lane]);
    if (ok[lane]) cuda::WarpPackStore<J>(code, bits, lane, o.words.data());
  });
  for (int lane = 1; lane < 32; ++lane) {
    EXPECT_EQ(ok[lane], ok[0]) << "lanes disagree on success";
    if (ok[0] && ok[lane]) {
      EXPECT_EQ(sc[lane], sc[0]) << "lanes disagree on the scale";
      EXPECT_EQ(zr[lane], zr[0]) << "lanes disagree on the zero";
    }
  }
  o.ok = ok[0];
  o.scale = sc[0];
  o.zero = zr[0];
  if (!o.ok) o.words.assign(o.words.size(), 0u);
  return o;
}

// kSumsBy4: the hybrid errors summed four loads at a time (the quantize-append's own kernels) or
// one at a time (the fused step's instance); both must give the reference's sums.
template <bool kSumsBy4>
Outcome OnWarpG(const std::vector<float>& x, int bits, QuantMode mode) {
  switch (x.size()) {
    case 32: return OnWarp<1, kSumsBy4>(x, bits, mode);
    case 64: return OnWarp<2, kSumsBy4>(x, bits, mode);
    default: return OnWarp<4, kSumsBy4>(x, bits, mode);
  }
}

std::string Show(const std::vector<float>& x) {
  std::string s;
  for (float v : x) s += std::to_string(v) + (std::signbit(v) && v == 0.f ? "(-0) " : " ");
  return s;
}

void ExpectSame(const std::vector<float>& x, int bits, QuantMode mode) {
  const Outcome want = testing::QuantReference(x.data(), static_cast<int>(x.size()), bits, mode);
  for (const bool by4 : {false, true}) {
    const Outcome got = by4 ? OnWarpG<true>(x, bits, mode) : OnWarpG<false>(x, bits, mode);
    SCOPED_TRACE("G=" + std::to_string(x.size()) + " bits=" + std::to_string(bits) + " mode=" +
                 std::to_string(static_cast<int>(mode)) + (by4 ? " sums by 4" : "") + " x: " + Show(x));
    ASSERT_EQ(got.ok, want.ok);
    if (!want.ok) continue;
    EXPECT_EQ(got.scale, want.scale);
    EXPECT_EQ(got.zero, want.zero);
    EXPECT_EQ(got.words, want.words);
  }
}

const QuantMode kModes[] = {QuantMode::kAsym, QuantMode::kSym, QuantMode::kHybrid};
const int kBits[] = {2, 3, 4, 8};
const int kGroups[] = {32, 64, 128};

TEST(WarpQuant, EdgeGroupsMatchTheReference) {
  std::mt19937 rng(20261204);
  for (int g : kGroups)
    for (int bits : kBits)
      for (QuantMode mode : kModes)
        for (int kind = 0; kind < testing::kEdgeKinds; ++kind) {
          ExpectSame(testing::EdgeGroup(kind, g, rng), bits, mode);
          if (HasFatalFailure()) return;
        }
}

TEST(WarpQuant, RandomGroupsMatchTheReference) {
  std::mt19937 rng(4242);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> scale(-3.f, 3.f);
  for (int g : kGroups)
    for (int bits : kBits)
      for (QuantMode mode : kModes)
        for (int rep = 0; rep < 6; ++rep) {
          const float s = std::pow(10.f, scale(rng));
          const float shift = rep % 2 ? nd(rng) * s : 0.f;
          std::vector<float> x(static_cast<size_t>(g));
          for (float& v : x) v = nd(rng) * s + shift;
          ExpectSame(x, bits, mode);
          if (HasFatalFailure()) return;
        }
}

}  // namespace
}  // namespace kvq
