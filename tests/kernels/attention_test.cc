// CpuRunStep attention against exact attention computed by the test in double precision on the
// cache dequantized by the test from the stored layout.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "test_util.h"

namespace kvq {
namespace testing {
namespace {

// Runs prefill + decode steps; after every step compares the outputs (the last `check_rows`
// query rows of the step, all of them when 0) with exact attention on the dequantized cache,
// and the cache content with the inputs.
void CheckScenario(const Model& m, const QuantConfig& cfg, const std::vector<int>& steps, uint64_t seed,
                   int check_rows = 0, float softmax_scale = 0.f, const std::string& what = "") {
  HostArena arena(int64_t{128} << 20);
  Seq s(m, cfg);
  std::mt19937_64 rng(seed);
  std::vector<uint16_t> o;
  for (size_t i = 0; i < steps.size(); ++i) {
    const int n = steps[i];
    const Tokens t = RandomTokens(m, n, rng);
    const Result r = RunOne(arena, s, s.cache->length(), t, &o, softmax_scale);
    ASSERT_TRUE(r.ok()) << r.message;
    const Dequant dq = DequantizeCache(*s.cache, arena.data());
    ExpectCacheMatchesHistory(s, dq);
    const int first = check_rows > 0 ? std::max(0, n - check_rows) : 0;
    const std::vector<double> ref = ExactAttention(m, dq, t.q, n, softmax_scale, first);
    const double err = NormalizedError(m, o, ref, first);
    ASSERT_LE(err, AttnTol(m.dtype)) << what << " step " << i << " n " << n << " length " << s.cache->length();
  }
  s.cache->Release(arena);
  EXPECT_EQ(arena.live_allocations(), 0);
  EXPECT_EQ(arena.Check(), "");
}

class AllPresetsTest : public ::testing::TestWithParam<std::tuple<Preset, DType, int>> {};

TEST_P(AllPresetsTest, MatchesExactAttentionOnTheStoredCache) {
  const auto [preset, dtype, d] = GetParam();
  Model m;
  m.hq = 6;
  m.hkv = 2;
  m.d = d;
  m.dtype = dtype;
  // Chunked prefill, decode across flushes, another chunk, more decode.
  std::vector<int> steps = {150, 37};
  for (int i = 0; i < 140; ++i) steps.push_back(1);
  steps.push_back(64);
  for (int i = 0; i < 5; ++i) steps.push_back(1);
  CheckScenario(m, PresetConfig(preset), steps, 1000 + int(preset) * 10 + d, 0, 0.f, PresetName(preset));
}

INSTANTIATE_TEST_SUITE_P(Kernels, AllPresetsTest,
                         ::testing::Combine(::testing::ValuesIn(AllPresets()),
                                            ::testing::Values(DType::kF16, DType::kBF16),
                                            ::testing::Values(64, 128)),
                         [](const auto& info) {
                           return std::string(PresetName(std::get<0>(info.param))) + "_" +
                                  DTypeName(std::get<1>(info.param)) + "_d" +
                                  std::to_string(std::get<2>(info.param));
                         });

TEST(Attention, Fp16PresetEqualsExactAttentionOnTheInputs) {
  // The fp16 preset stores the inputs bit-exactly (checked against the history), so the
  // comparison is with exact attention on the inputs themselves.
  Model m;
  m.hq = 8;
  m.hkv = 8;
  m.d = 128;
  CheckScenario(m, PresetConfig(Preset::kFp16), {1, 1, 300, 1, 7, 1}, 2000);
  m.dtype = DType::kBF16;
  CheckScenario(m, PresetConfig(Preset::kFp16), {200, 1, 1}, 2001, 0, 0.3f);
}

TEST(Attention, HeadDim256AndExplicitConfigs) {
  Model m;
  m.hq = 4;
  m.hkv = 1;
  m.d = 256;
  QuantConfig c;
  c.k = TensorFormat{QuantMode::kAsym, 8, Grouping::kAlongChannels, 64, 16, 1};
  c.v = TensorFormat{QuantMode::kHybrid, 4, Grouping::kAlongTokens, 128, 0, 128};
  c.sink = 4;
  c.key_norm = true;
  ASSERT_EQ(ValidateConfig(c, 256), "");
  CheckScenario(m, c, {300, 1, 1, 130, 1}, 2100);
  // Longer: split-KV chunks (512 tokens) no longer align with the 32-token tiles after a sink of 4.
  CheckScenario(m, c, {700, 1, 400, 1, 1}, 2102, 3);
  c.k = TensorFormat{QuantMode::kSym, 3, Grouping::kAlongTokens, 64, 5, 64};
  c.v = TensorFormat{QuantMode::kAsym, 3, Grouping::kAlongChannels, 128, 0, 3};
  c.sink = 128;
  c.key_norm = false;
  ASSERT_EQ(ValidateConfig(c, 256), "");
  CheckScenario(m, c, {100, 40, 1, 200, 1, 1}, 2101);
}

TEST(Attention, EdgeLengths) {
  // 0 (empty body), 1, G-1, G, G+1, keep, keep + flush, and a few around page boundaries.
  Model m;
  for (Preset p : {Preset::kKivi2, Preset::kInnerQ}) {
    const QuantConfig c = PresetConfig(p);
    for (int len : {1, 31, 32, 33, 96, 97, 127, 128, 129, 160, 224, 225, 256, 257}) {
      CheckScenario(m, c, {len, 1, 1}, 3000 + len, 0, 0.f, std::string(PresetName(p)) + " prefill " +
                                                               std::to_string(len));
    }
  }
}

TEST(Attention, Length4096) {
  Model m;
  m.hq = 4;
  m.hkv = 2;
  for (Preset p : AllPresets()) {
    // Prefill in chunks of 1024 (checking the last rows of each chunk), then decode.
    CheckScenario(m, PresetConfig(p), {1024, 1024, 1024, 1023, 1, 1, 1}, 4000 + int(p), 4, 0.f, PresetName(p));
  }
}

TEST(Attention, ConstantAndZeroCachesStayFinite) {
  // Whole groups of zeros or of one constant go through flush and attention without NaN/inf and
  // still match exact attention on what is stored.
  Model m;
  for (Preset p : AllPresets()) {
    for (float c : {0.f, 2.5f}) {
      HostArena arena(32 << 20);
      Seq s(m, PresetConfig(p));
      std::mt19937_64 rng(5100);
      std::vector<uint16_t> o;
      for (int step = 0; step < 4; ++step) {
        Tokens t = RandomTokens(m, step == 0 ? 300 : 1, rng);
        for (auto& x : t.k) x = StoreAct(c, m.dtype);
        for (auto& x : t.v) x = StoreAct(-c, m.dtype);
        ASSERT_TRUE(RunOne(arena, s, s.cache->length(), t, &o).ok()) << PresetName(p);
        const int n = int(t.k.size() / size_t(m.hkv * m.d));
        const Dequant dq = DequantizeCache(*s.cache, arena.data());
        ExpectCacheMatchesHistory(s, dq);
        const std::vector<double> ref = ExactAttention(m, dq, t.q, n);
        for (size_t i = 0; i < ref.size(); ++i) {
          const float x = LoadAct(&o[i], m.dtype);
          ASSERT_TRUE(std::isfinite(x)) << PresetName(p);
          ASSERT_NEAR(x, ref[i], 1e-3 * (1 + std::fabs(ref[i]))) << PresetName(p) << " c " << c;
        }
      }
      s.cache->Release(arena);
    }
  }
}

TEST(Attention, GqaHeadMapping) {
  // Query head h reads KV head h / (Hq / Hkv): KV heads get very different values, so a wrong
  // mapping (e.g. h % Hkv) would be far off.
  Model m;
  m.hq = 12;
  m.hkv = 3;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kInnerQ));
  std::mt19937_64 rng(5000);
  std::vector<uint16_t> o;
  for (int step = 0; step < 3; ++step) {
    Tokens t = RandomTokens(m, step == 0 ? 200 : 1, rng);
    const size_t per = size_t(m.hkv) * m.d;
    for (size_t i = 0; i < t.v.size(); ++i) {
      const int h = int((i % per) / size_t(m.d));
      t.v[i] = StoreAct(LoadAct(&t.v[i], m.dtype) * 0.1f + 10.f * float(h + 1), m.dtype);
    }
    ASSERT_TRUE(RunOne(arena, s, s.cache->length(), t, &o).ok());
    const int n = int(t.k.size() / per);
    for (int hh = 0; hh < m.hq; ++hh) {
      double mean = 0;
      for (int c = 0; c < m.d; ++c) mean += LoadAct(&o[(size_t(n - 1) * m.hq + hh) * m.d + c], m.dtype);
      mean /= m.d;
      EXPECT_NEAR(mean, 10.0 * (hh / 4 + 1), 1.0) << "query head " << hh;
    }
    const Dequant dq = DequantizeCache(*s.cache, arena.data());
    EXPECT_LE(NormalizedError(m, o, ExactAttention(m, dq, t.q, n)), AttnTol(m.dtype));
  }
  s.cache->Release(arena);
}

TEST(Attention, WideGqaGroupsWithSplitKv) {
  // 32 query heads on one KV head: one GQA group is wider than an item's usual row budget, and
  // a long context splits it over several KV chunks.
  Model m;
  m.hq = 32;
  m.hkv = 1;
  CheckScenario(m, PresetConfig(Preset::kInnerQ), {1200, 1, 1}, 5200, 2);
  CheckScenario(m, PresetConfig(Preset::kKivi2), {900, 1, 3}, 5201, 3);
}

TEST(Attention, BatchOfMixedSequencesEqualsEachAlone) {
  // Several sequences with different presets, lengths and n in one batch give exactly the outputs
  // of running each alone, and match exact attention.
  for (DType dt : {DType::kF16, DType::kBF16}) {
    Model m;
    m.hq = 8;
    m.hkv = 2;
    m.dtype = dt;
    const std::vector<Preset> presets = {Preset::kKivi2, Preset::kInnerQ, Preset::kFp16, Preset::kInnerQ2,
                                         Preset::kKivi4, Preset::kInnerQBase};
    HostArena batch_arena(256 << 20), solo_arena(256 << 20);
    std::vector<std::unique_ptr<Seq>> batch, solo;
    for (Preset p : presets) {
      batch.push_back(std::make_unique<Seq>(m, PresetConfig(p)));
      solo.push_back(std::make_unique<Seq>(m, PresetConfig(p)));
    }
    std::mt19937_64 rng(6000);
    for (int step = 0; step < 12; ++step) {
      std::vector<Tokens> toks;
      for (size_t i = 0; i < presets.size(); ++i) {
        const int n = step == 0 ? 40 + 70 * int(i) : (step + int(i)) % 4 == 0 ? 9 : 1;
        toks.push_back(RandomTokens(m, n, rng));
      }
      std::vector<StepIn> ins;
      for (size_t i = 0; i < presets.size(); ++i) ins.push_back({batch[i].get(), batch[i]->cache->length(), &toks[i]});
      std::vector<uint16_t> ob;
      ASSERT_TRUE(RunBatch(batch_arena, ins, &ob).ok());
      size_t row = 0;
      for (size_t i = 0; i < presets.size(); ++i) {
        std::vector<uint16_t> os;
        ASSERT_TRUE(RunOne(solo_arena, *solo[i], solo[i]->cache->length(), toks[i], &os, 0.f, 1).ok());
        ASSERT_TRUE(std::equal(os.begin(), os.end(), ob.begin() + std::ptrdiff_t(row))) << "sequence " << i;
        const int n = int(toks[i].k.size() / size_t(m.hkv * m.d));
        const Dequant dq = DequantizeCache(*batch[i]->cache, batch_arena.data());
        const std::vector<uint16_t> oi(ob.begin() + std::ptrdiff_t(row), ob.begin() + std::ptrdiff_t(row + os.size()));
        EXPECT_LE(NormalizedError(m, oi, ExactAttention(m, dq, toks[i].q, n)), AttnTol(dt));
        row += os.size();
      }
    }
    for (auto& s : batch) s->cache->Release(batch_arena);
    for (auto& s : solo) s->cache->Release(solo_arena);
    EXPECT_EQ(batch_arena.live_allocations(), 0);
  }
}

TEST(Retry, RollbackOfSeveralStepsAndReplay) {
  // Run three steps, truncate back to the first one's position and replay them. A replayed step
  // gives bit-identical outputs when no later step had flushed more tokens into a body (a
  // quantized token cannot be un-quantized: the replay then sees the larger body, which is the
  // contract); every replayed step matches exact attention on what is stored; the replay ends in
  // the same state with the same stored cache.
  Model m;
  int identical = 0;
  for (Preset p : AllPresets()) {
    HostArena arena(64 << 20);
    Seq s(m, PresetConfig(p));
    std::mt19937_64 rng(7000 + int(p));
    std::vector<uint16_t> o;
    ASSERT_TRUE(RunOne(arena, s, 0, RandomTokens(m, 250, rng), &o).ok());
    for (int i = 0; i < 40; ++i) ASSERT_TRUE(RunOne(arena, s, s.cache->length(), RandomTokens(m, 1, rng), &o).ok());
    const int start = s.cache->length();
    std::vector<Tokens> toks;
    std::vector<std::vector<uint16_t>> outs;
    std::vector<std::pair<int, int>> bodies;
    for (int i = 0; i < 3; ++i) {
      toks.push_back(RandomTokens(m, i == 1 ? 3 : 1, rng));
      outs.emplace_back();
      ASSERT_TRUE(RunOne(arena, s, s.cache->length(), toks.back(), &outs.back()).ok());
      bodies.emplace_back(s.cache->k().body_len, s.cache->v().body_len);
    }
    const Dequant before = DequantizeCache(*s.cache, arena.data());
    const StreamState k0 = s.cache->k(), v0 = s.cache->v();
    const int64_t live = arena.live_bytes();
    if (start < s.cache->min_position()) {
      StepPlan plan;
      EXPECT_EQ(s.cache->Plan(start, 1, arena, &plan).code, Code::kFailedPrecondition) << PresetName(p);
      s.cache->Release(arena);
      continue;
    }
    int pos = start;
    for (int i = 0; i < 3; ++i) {
      std::vector<uint16_t> o2;
      ASSERT_TRUE(RunOne(arena, s, pos, toks[size_t(i)], &o2).ok()) << PresetName(p);
      const int n = int(toks[size_t(i)].k.size() / size_t(m.hkv * m.d));
      if (bodies[size_t(i)] == bodies.back()) {
        EXPECT_EQ(o2, outs[size_t(i)]) << PresetName(p) << " replayed step " << i;
        ++identical;
      }
      const Dequant dq = DequantizeCache(*s.cache, arena.data());
      ExpectCacheMatchesHistory(s, dq);
      EXPECT_LE(NormalizedError(m, o2, ExactAttention(m, dq, toks[size_t(i)].q, n)), AttnTol(m.dtype));
      pos += n;
    }
    const Dequant after = DequantizeCache(*s.cache, arena.data());
    EXPECT_EQ(before.k, after.k) << PresetName(p);
    EXPECT_EQ(before.v, after.v) << PresetName(p);
    EXPECT_EQ(s.cache->k().body_len, k0.body_len);
    EXPECT_EQ(s.cache->k().win_len, k0.win_len);
    EXPECT_EQ(s.cache->v().body_len, v0.body_len);
    EXPECT_EQ(s.cache->v().win_len, v0.win_len);
    EXPECT_EQ(arena.live_bytes(), live);
    // Retrying just the last step always gives identical outputs.
    ASSERT_TRUE(RunOne(arena, s, pos - 1, toks[2], &o).ok());
    EXPECT_EQ(o, outs[2]);
    s.cache->Release(arena);
    EXPECT_EQ(arena.live_allocations(), 0);
  }
  EXPECT_GE(identical, 6);
}

TEST(Retry, RetryOfTheLastStepWorksForEveryPresetAtEveryLength) {
  Model m;
  for (Preset p : AllPresets()) {
    HostArena arena(64 << 20);
    Seq s(m, PresetConfig(p));
    std::mt19937_64 rng(7100 + int(p));
    std::vector<uint16_t> o, o2;
    for (int i = 0; i < 300; ++i) {
      const Tokens t = RandomTokens(m, 1 + (i % 11 == 0 ? 2 : 0), rng);
      const int pos = s.cache->length();
      ASSERT_TRUE(RunOne(arena, s, pos, t, &o).ok());
      if (i % 7 == 0) {
        const Result r = RunOne(arena, s, pos, t, &o2);
        ASSERT_TRUE(r.ok()) << PresetName(p) << " " << r.message;
        ASSERT_EQ(o, o2) << PresetName(p) << " step " << i;
      }
    }
    s.cache->Release(arena);
  }
}

TEST(Step, RejectsOutOfRangeValuesWithoutChangingTheCache) {
  Model m;
  m.dtype = DType::kBF16;  // bf16 can carry values beyond fp16 range
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kKivi2));
  std::mt19937_64 rng(8000);
  std::vector<uint16_t> o;
  Tokens t = RandomTokens(m, 200, rng);
  t.k[1000] = StoreAct(1e9f, m.dtype);
  ASSERT_TRUE(RunOne(arena, s, 0, t, &o).ok());  // full precision: fine until quantized
  const int64_t live = arena.live_bytes();
  const Result r = RunOne(arena, s, 200, RandomTokens(m, 1, rng), &o);
  EXPECT_EQ(r.code, Code::kInvalidArgument);
  EXPECT_NE(r.message.find("fp16"), std::string::npos) << r.message;
  EXPECT_EQ(arena.live_bytes(), live);
  EXPECT_EQ(s.cache->length(), 200);
  s.cache->Release(arena);
}

TEST(Step, FailedTruncatingStepLeavesTheCommittedCacheIntact) {
  // A retry that truncates and then fails in its flush must not have overwritten the committed
  // window (the appends run only after every flush succeeded).
  Model m;
  m.dtype = DType::kBF16;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kKivi2));
  std::mt19937_64 rng(8100);
  std::vector<uint16_t> o;
  Tokens t = RandomTokens(m, 200, rng);
  t.v[size_t(5) * m.hkv * m.d] = StoreAct(1e9f, m.dtype);  // token 5, KV head 0, channel 0
  ASSERT_TRUE(RunOne(arena, s, 0, t, &o).ok());
  const int64_t live = arena.live_bytes();
  for (int threads : {1, 2}) {
    const Result r = RunOne(arena, s, 150, RandomTokens(m, 1, rng), &o, 0.f, threads);
    EXPECT_EQ(r.code, Code::kInvalidArgument);
    EXPECT_EQ(s.cache->length(), 200);
    EXPECT_EQ(arena.live_bytes(), live);
    ExpectCacheMatchesHistory(s, DequantizeCache(*s.cache, arena.data()));
  }
  s.cache->Release(arena);
}

TEST(Step, ConcurrentCallersGetTheSameOutputsAsSerialOnes) {
  // The store may run steps of different sessions from several threads at once: each call is
  // independent (the worker pool runs one loop at a time; other callers run theirs inline).
  Model m;
  m.hq = 6;
  m.hkv = 3;
  constexpr int kCallers = 4;
  std::vector<std::vector<uint16_t>> serial(kCallers), concurrent(kCallers);
  auto run = [&](int who, std::vector<uint16_t>* all) {
    HostArena arena(32 << 20);
    Seq s(m, PresetConfig(who % 2 ? Preset::kInnerQ : Preset::kKivi2));
    std::mt19937_64 rng(8200 + who);
    std::vector<uint16_t> o;
    for (int i = 0; i < 60; ++i) {
      const Tokens t = RandomTokens(m, i == 0 ? 700 : 1, rng);
      if (!RunOne(arena, s, s.cache->length(), t, &o).ok()) return;
      all->insert(all->end(), o.begin(), o.end());
    }
    s.cache->Release(arena);
  };
  for (int i = 0; i < kCallers; ++i) run(i, &serial[size_t(i)]);
  std::vector<std::thread> th;
  for (int i = 0; i < kCallers; ++i) th.emplace_back(run, i, &concurrent[size_t(i)]);
  for (auto& t : th) t.join();
  for (int i = 0; i < kCallers; ++i) {
    ASSERT_FALSE(serial[size_t(i)].empty());
    EXPECT_EQ(serial[size_t(i)], concurrent[size_t(i)]) << "caller " << i;
  }
}

TEST(Step, SoftmaxScaleAndThreadCountsAgree) {
  Model m;
  m.hq = 9;
  m.hkv = 3;
  for (int threads : {1, 2, 3}) {
    HostArena a(64 << 20);
    Seq s(m, PresetConfig(Preset::kInnerQ));
    std::mt19937_64 rng(9000);
    std::vector<uint16_t> o;
    ASSERT_TRUE(RunOne(a, s, 0, RandomTokens(m, 333, rng), &o, 0.07f, threads).ok());
    const Tokens t = RandomTokens(m, 2, rng);
    ASSERT_TRUE(RunOne(a, s, 333, t, &o, 0.07f, threads).ok());
    const Dequant dq = DequantizeCache(*s.cache, a.data());
    EXPECT_LE(NormalizedError(m, o, ExactAttention(m, dq, t.q, 2, 0.07f)), AttnTol(m.dtype));
    s.cache->Release(a);
  }
}

}  // namespace
}  // namespace testing
}  // namespace kvq
