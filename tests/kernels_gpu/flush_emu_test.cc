// The CUDA quantize-append's flush run on the CPU: the batch flattened by the runner's own
// FlattenBatch, then every flush group of every head quantized by FlushGroup
// (kernels/cuda/flush_group.cuh, the code the kernel runs) on an emulated warp of 32 threads
// (tests/kernels/warp_emu.h), over a real arena. The body pages must be byte-identical to those
// of CpuQuantizeAppend on the same arena. This checks the kernel's group addressing, loads,
// key normalization and stores without a GPU; the block / chunk split and the append are checked
// by kernels_gpu_test on a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvq/reference.h"
#include "scenario.h"
#include "warp_emu.h"
#include "flush_group.cuh"

namespace kvq {
namespace {

using testing::Arena;
using testing::TSeq;
using testing::TStep;

TensorFormat Fmt(QuantMode m, int bits, Grouping g, int gs, int keep, int flush) {
  TensorFormat f;
  f.mode = m;
  f.bits = bits;
  f.grouping = g;
  f.group_size = gs;
  f.keep = keep;
  f.flush = flush;
  return f;
}

// Every third window token gets values whose quantization the sequential reference resolves by
// element order (signed zeros, constants, repeated extremes, two-level groups).
float WindowValue(int t, int h, int c, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  if (t % 3 != 0) return nd(rng) * ((c % 16 == 3) ? 8.f : 1.f);
  const bool neg_zero = ((t / 3 + c / 5 + h) & 1) != 0;
  switch ((t / 3) % 5) {
    case 0: return neg_zero ? -0.f : 0.f;
    case 1: return 0.75f;
    case 2: return (c % 4 == 0) ? (neg_zero ? -0.f : 0.f) : std::fabs(nd(rng)) + 0.5f;
    case 3: return (c % 2) ? 1.f : -1.f;
    default: return std::round(nd(rng) * 2.f) / 2.f;
  }
}

// One sequence of L0 tokens, its first step (flush of the initial window + one new token):
// emulated kernel flush against the reference.
void CheckFlush(const QuantConfig& cfg, DType dt, int hkv, int d, int L0, int win_first, uint32_t seed) {
  SCOPED_TRACE("D=" + std::to_string(d) + " " + DTypeName(dt) + " L0=" + std::to_string(L0));
  std::mt19937 rng(seed);
  Arena a;
  TSeq s = testing::MakeSeq(a, cfg, hkv, d, dt, L0, win_first, rng);
  for (const testing::TStream* st : {&s.k, &s.v})
    for (int i = 0; i < st->win_len; ++i) {
      const int idx = st->win_first + i;
      uint16_t* p = reinterpret_cast<uint16_t*>(a.bytes().data() + st->win[size_t(idx / kPageTokens)]);
      for (int h = 0; h < hkv; ++h)
        for (int c = 0; c < d; ++c)
          p[(int64_t{h} * kPageTokens + idx % kPageTokens) * d + c] = testing::ToAct(WindowValue(i, h, c, rng), dt);
    }
  TStep st = testing::PlanStep(a, s, hkv, d, 1, 0, 0);
  st.Point();
  ASSERT_TRUE(st.w.flush_k > 0 || st.w.flush_v > 0) << "the case must flush";

  // The reference on one copy of the arena.
  std::vector<uint8_t> ref = a.bytes();
  const std::vector<uint16_t> kn = testing::RandomActs(int64_t{hkv} * d, dt, rng, 1.f);
  const std::vector<uint16_t> vn = testing::RandomActs(int64_t{hkv} * d, dt, rng, 1.f);
  StepParams p;
  p.num_q_heads = hkv;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.dtype = dt;
  p.k_new = kn.data();
  p.v_new = vn.data();
  std::vector<uint16_t> q(size_t(hkv) * d, 0), o(size_t(hkv) * d, 0);  // unused by the flush and append
  p.q = q.data();
  p.o = o.data();
  const Result r = CpuQuantizeAppend(p, &st.w, &cfg, 1, ref.data(), 1);
  ASSERT_TRUE(r.ok()) << r.message;

  // The kernel's flush on another copy.
  std::vector<uint8_t> emu = a.bytes();
  std::vector<cuda::DevSeq> seqs;
  std::vector<int64_t> pages;
  bool ready = false;
  const Result fr = cuda::FlattenBatch(p, &st.w, &cfg, 1, &seqs, &pages, &ready);
  ASSERT_TRUE(fr.ok()) << fr.message;
  const cuda::DevSeq& ds = seqs[0];
  if (ds.key_norm) {  // factors of the reference's key-norm pass (KeyNormKernel is its own launch)
    ASSERT_GE(ds.norm_offset, 0);
    std::memcpy(emu.data() + ds.norm_offset, ref.data() + ds.norm_offset, size_t(hkv) * d * sizeof(float));
  }
  int32_t flag = 0;
  cuda::QaArgs qa{};
  qa.arena = emu.data();
  qa.seqs = seqs.data();
  qa.pages = pages.data();
  qa.num_kv_heads = hkv;
  qa.head_dim = d;
  qa.dtype = static_cast<int32_t>(dt);
  qa.error_flag = &flag;
  int groups_run = 0;
  for (const cuda::DevTensor* x : {&ds.k, &ds.v}) {
    if (x->flush <= 0 || x->mode == static_cast<int32_t>(QuantMode::kFull)) continue;
    const bool norm = x == &ds.k && ds.key_norm;
    const int G = x->group_size;
    const bool along_channels = x->grouping == static_cast<int32_t>(Grouping::kAlongChannels);
    const int num_groups = along_channels ? x->flush * (d / G) : (x->flush / G) * d;
    std::vector<float> err(2 * kMaxGroupSize);
    for (int h = 0; h < hkv; ++h) {
      const float* knorm = norm ? reinterpret_cast<const float*>(emu.data() + ds.norm_offset) + h * d : nullptr;
      for (int gi = 0; gi < num_groups; ++gi, ++groups_run) {
        cuda::warp::RunWarp([&](int lane) {
          if (G == 32) {
            cuda::FlushGroup<1>(qa, *x, h, gi, norm, knorm, err.data(), lane);
          } else if (G == 64) {
            cuda::FlushGroup<2>(qa, *x, h, gi, norm, knorm, err.data(), lane);
          } else {
            cuda::FlushGroup<4>(qa, *x, h, gi, norm, knorm, err.data(), lane);
          }
        });
      }
    }
  }
  EXPECT_GT(groups_run, 0);
  EXPECT_EQ(flag, 0) << "the emulated kernel reported a bad value";
  // Body pages byte-identical (codes, scales, zeros); nothing else written.
  int64_t diffs = 0, first = -1;
  for (size_t i = 0; i < emu.size(); ++i) {
    const bool in_body = [&] {
      for (const std::vector<int64_t>* pl : {&st.kb, &st.vb})
        for (int64_t pg : *pl) {
          const TensorFormat& f = pl == &st.kb ? cfg.k : cfg.v;
          const int64_t n = MakeStreamLayout(f, hkv, d).quant_page_bytes;
          if (int64_t(i) >= pg && int64_t(i) < pg + n) return true;
        }
      return false;
    }();
    const uint8_t want = in_body ? ref[i] : a.bytes()[i];
    if (emu[i] != want && (!ds.key_norm || int64_t(i) < ds.norm_offset ||
                           int64_t(i) >= ds.norm_offset + int64_t{hkv} * d * 4)) {
      if (first < 0) first = int64_t(i);
      ++diffs;
    }
  }
  EXPECT_EQ(diffs, 0) << "emulated flush differs from the reference in " << diffs << " bytes, first at " << first;
}

TEST(FlushEmulation, PresetsMatchTheReference) {
  for (Preset pr : {Preset::kKivi2, Preset::kKivi4, Preset::kInnerQ, Preset::kInnerQ2, Preset::kInnerQBase}) {
    SCOPED_TRACE(PresetName(pr));
    const QuantConfig cfg = PresetConfig(pr);
    CheckFlush(cfg, DType::kF16, 2, 64, 300, 5, 11);
    if (HasFatalFailure()) return;
  }
  CheckFlush(PresetConfig(Preset::kInnerQ), DType::kBF16, 2, 128, 200, 0, 12);
}

TEST(FlushEmulation, CustomConfigsMatchTheReference) {
  QuantConfig a;  // G = 64 and 128, key normalization, a sink
  a.k = Fmt(QuantMode::kHybrid, 3, Grouping::kAlongChannels, 64, 3, 1);
  a.v = Fmt(QuantMode::kAsym, 4, Grouping::kAlongTokens, 128, 5, 128);
  a.sink = 4;
  a.key_norm = true;
  QuantConfig b;
  b.k = Fmt(QuantMode::kSym, 2, Grouping::kAlongTokens, 64, 0, 64);
  b.v = Fmt(QuantMode::kHybrid, 4, Grouping::kAlongChannels, 128, 2, 3);
  ASSERT_EQ(ValidateConfig(a, 128), "");
  ASSERT_EQ(ValidateConfig(b, 128), "");
  CheckFlush(a, DType::kF16, 2, 128, 300, 100, 21);
  if (HasFatalFailure()) return;
  CheckFlush(b, DType::kBF16, 1, 128, 260, 3, 22);
}

}  // namespace
}  // namespace kvq
