// LayerCache: the window policy of each preset, positions, truncation and retry, page accounting.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "test_util.h"

namespace kvq {
namespace testing {
namespace {

// Decodes `steps` tokens one at a time after a prefill of `prefill`, calling check(length) after
// every committed step.
template <typename F>
void Decode(HostArena& arena, Seq& s, int prefill, int steps, std::mt19937_64& rng, F&& check) {
  std::vector<uint16_t> o;
  if (prefill > 0) {
    const Tokens t = RandomTokens(s.model, prefill, rng);
    ASSERT_TRUE(RunOne(arena, s, 0, t, &o).ok());
    check(s.cache->length());
  }
  for (int i = 0; i < steps; ++i) {
    const Tokens t = RandomTokens(s.model, 1, rng);
    const Result r = RunOne(arena, s, s.cache->length(), t, &o);
    ASSERT_TRUE(r.ok()) << r.message;
    check(s.cache->length());
  }
}

TEST(Policy, Kivi2MatchesReleasedKivi) {
  // KIVI's released code: the key window holds 1..128 tokens at attention time and is quantized
  // 128 at a time when it reaches 128; the value window holds R + 1 = 129 at attention, then
  // slides by one. After a prefill of T: keys T % 128 in full precision, values the last 128.
  Model m;
  for (int prefill : {0, 1, 127, 128, 129, 1000}) {
    HostArena arena(64 << 20);
    Seq s(m, PresetConfig(Preset::kKivi2));
    std::mt19937_64 rng(100 + prefill);
    int step = 0;
    Decode(arena, s, prefill, 300, rng, [&](int L) {
      const auto& k = s.cache->k();
      const auto& v = s.cache->v();
      if (step++ == 0 && prefill > 0) {
        // Attention of the prefill sees everything in full precision (flush is lazy).
        EXPECT_EQ(k.win_len, L);
        EXPECT_EQ(v.win_len, L);
        return;
      }
      const int kwin = (L - 1) % 128 + 1;
      EXPECT_EQ(k.win_len, kwin) << "L " << L;
      EXPECT_EQ(k.body_len, L - kwin);
      EXPECT_EQ(k.body_len % 128, 0);
      EXPECT_EQ(v.win_len, std::min(L, 129)) << "L " << L;
      EXPECT_EQ(v.body_len, L - std::min(L, 129));
      EXPECT_EQ(s.cache->sink_len(), 0);
    });
    ASSERT_EQ(arena.Check(), "");
    s.cache->Release(arena);
    EXPECT_EQ(arena.live_allocations(), 0);
  }
}

TEST(Policy, InnerQSinkWindowsAndValueFlush) {
  Model m;
  for (Preset preset : {Preset::kInnerQ, Preset::kInnerQ2, Preset::kInnerQBase}) {
    for (int prefill : {0, 5, 32, 100, 500}) {
      HostArena arena(64 << 20);
      Seq s(m, PresetConfig(preset));
      std::mt19937_64 rng(200 + prefill);
      int v_win_model = 0;  // the V window after the previous step, simulated from the policy text
      int prev_len = 0;
      Decode(arena, s, prefill, 260, rng, [&](int L) {
        const auto& k = s.cache->k();
        const auto& v = s.cache->v();
        const int n = L - prev_len;
        prev_len = L;
        EXPECT_EQ(s.cache->sink_len(), std::min(L, 32));
        const int after_sink = std::max(0, L - 32);
        // V: flush 32 while the window holds >= 128, then append.
        int w = v_win_model;
        while (w >= 96 + 32) w -= 32;
        const int appended = std::min(n, after_sink);
        v_win_model = w + appended;
        EXPECT_EQ(v.win_len, v_win_model) << PresetName(preset) << " L " << L;
        EXPECT_EQ(v.body_len % 32, 0);
        EXPECT_EQ(v.body_len + v.win_len, after_sink);
        EXPECT_EQ(k.body_len + k.win_len, after_sink);
        if (n == 1 && L > 32 + 97) {
          EXPECT_EQ(k.win_len, 97) << PresetName(preset) << " L " << L;  // 96 kept + the new one
          EXPECT_GE(v.win_len, 97);
          EXPECT_LE(v.win_len, 128);
        }
        EXPECT_EQ(s.cache->norm_ready(), k.body_len > 0);
      });
      ASSERT_EQ(arena.Check(), "");
      s.cache->Release(arena);
      EXPECT_EQ(arena.live_allocations(), 0);
    }
  }
}

TEST(Policy, Fp16PresetOnlyGrowsTheWindow) {
  Model m;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kFp16));
  std::mt19937_64 rng(300);
  Decode(arena, s, 200, 100, rng, [&](int L) {
    EXPECT_EQ(s.cache->k().win_len, L);
    EXPECT_EQ(s.cache->v().win_len, L);
    EXPECT_EQ(s.cache->k().body_len, 0);
    EXPECT_EQ(s.cache->min_position(), 0);
  });
  const CacheBytes b = s.cache->bytes();
  EXPECT_EQ(b.codes + b.scales + b.metadata, 0);
  EXPECT_EQ(b.full_precision, 2 * 3 * MakeStreamLayout(TensorFormat{}, m.hkv, m.d).fp_page_bytes);
  s.cache->Release(arena);
}

TEST(Policy, KeyNormFactorsFromTheFirstFlushedKeysThenFrozen) {
  Model m;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kInnerQ));
  std::mt19937_64 rng(400);
  std::vector<uint16_t> o;
  const Tokens pre = RandomTokens(m, 400, rng);
  ASSERT_TRUE(RunOne(arena, s, 0, pre, &o).ok());
  EXPECT_FALSE(s.cache->norm_ready());
  const Tokens t1 = RandomTokens(m, 1, rng);
  ASSERT_TRUE(RunOne(arena, s, 400, t1, &o).ok());
  ASSERT_TRUE(s.cache->norm_ready());
  // The first flush quantized tokens 32 .. 400 - 96 (prefill keys outside sink and window).
  EXPECT_EQ(s.cache->k().body_len, 400 - 32 - 96);
  const float* f = reinterpret_cast<const float*>(arena.data() + s.cache->norm_offset());
  std::vector<float> want(size_t(m.hkv) * m.d);
  for (int h = 0; h < m.hkv; ++h)
    for (int c = 0; c < m.d; ++c) {
      float mx = 0;
      for (int t = 32; t < 400 - 96; ++t)
        mx = std::max(mx, std::fabs(LoadAct(&pre.k[(size_t(t) * m.hkv + h) * m.d + c], m.dtype)));
      want[size_t(h) * m.d + c] = KeyNormFactor(mx);
      ASSERT_EQ(f[h * m.d + c], want[size_t(h) * m.d + c]);
    }
  for (int i = 0; i < 50; ++i) {
    Tokens t = RandomTokens(m, 1, rng);
    for (auto& x : t.k) x = StoreAct(LoadAct(&x, m.dtype) * 100.f, m.dtype);  // bigger keys later
    ASSERT_TRUE(RunOne(arena, s, s.cache->length(), t, &o).ok());
  }
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(f[i], want[i]) << "factors must stay frozen";
  s.cache->Release(arena);
}

TEST(Positions, ErrorsLeaveEverythingUnchanged) {
  Model m;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kKivi2));
  std::mt19937_64 rng(500);
  std::vector<uint16_t> o;
  ASSERT_TRUE(RunOne(arena, s, 0, RandomTokens(m, 300, rng), &o).ok());
  ASSERT_TRUE(RunOne(arena, s, 300, RandomTokens(m, 1, rng), &o).ok());
  // K body 256, V body 301 - 129 = 172: min position 256.
  EXPECT_EQ(s.cache->min_position(), 256);
  const int64_t live = arena.live_bytes();
  StepPlan plan;
  Result r = s.cache->Plan(302, 1, arena, &plan);
  EXPECT_EQ(r.code, Code::kFailedPrecondition);
  EXPECT_NE(r.message.find("301"), std::string::npos) << r.message;
  r = s.cache->Plan(255, 1, arena, &plan);
  EXPECT_EQ(r.code, Code::kFailedPrecondition);
  r = s.cache->Plan(-1, 1, arena, &plan);
  EXPECT_EQ(r.code, Code::kFailedPrecondition);
  r = s.cache->Plan(301, 0, arena, &plan);
  EXPECT_EQ(r.code, Code::kInvalidArgument);
  EXPECT_EQ(arena.live_bytes(), live);
  EXPECT_EQ(s.cache->length(), 301);
  // A plan that is aborted leaves nothing allocated and the cache as it was.
  ASSERT_TRUE(s.cache->Plan(256, 200, arena, &plan).ok());
  EXPECT_GT(arena.live_bytes(), live);
  LayerCache::Abort(&plan, arena);
  EXPECT_EQ(arena.live_bytes(), live);
  EXPECT_EQ(s.cache->length(), 301);
  EXPECT_EQ(arena.Check(), "");
  s.cache->Release(arena);
}

TEST(Positions, InvalidShapesAreRefused) {
  HostArena arena(1 << 20);
  CacheShape bad;
  bad.num_kv_heads = 2;
  bad.head_dim = 96;  // unsupported
  bad.config = PresetConfig(Preset::kKivi2);
  LayerCache c(bad);
  StepPlan plan;
  Result r = c.Plan(0, 1, arena, &plan);
  EXPECT_EQ(r.code, Code::kInvalidArgument);
  EXPECT_NE(r.message.find("head_dim"), std::string::npos) << r.message;
  bad.head_dim = 64;
  bad.config.k.flush = 100;  // along_tokens flush not a multiple of G
  LayerCache c2(bad);
  r = c2.Plan(0, 1, arena, &plan);
  EXPECT_EQ(r.code, Code::kInvalidArgument);
  EXPECT_NE(r.message.find("flush"), std::string::npos) << r.message;
  EXPECT_EQ(arena.live_allocations(), 0);
}

TEST(Positions, PoolExhaustionAllocatesNothing) {
  Model m;
  const int64_t fp = MakeStreamLayout(TensorFormat{}, m.hkv, m.d).fp_page_bytes;
  HostArena arena(3 * (fp + HostArena::kGuardBytes));
  Seq s(m, PresetConfig(Preset::kFp16));
  std::mt19937_64 rng(501);
  std::vector<uint16_t> o;
  ASSERT_TRUE(RunOne(arena, s, 0, RandomTokens(m, 128, rng), &o).ok());  // 2 pages
  StepPlan plan;
  const Result r = s.cache->Plan(128, 1, arena, &plan);  // needs 2 more
  EXPECT_EQ(r.code, Code::kResourceExhausted);
  EXPECT_EQ(arena.live_allocations(), 2);
  s.cache->Release(arena);
  EXPECT_EQ(arena.live_allocations(), 0);
}

TEST(Positions, TruncationIntoSinkWhileBodiesAreEmpty) {
  Model m;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kInnerQ));
  std::mt19937_64 rng(502);
  std::vector<uint16_t> o;
  ASSERT_TRUE(RunOne(arena, s, 0, RandomTokens(m, 50, rng), &o).ok());
  EXPECT_EQ(s.cache->min_position(), 0);
  ASSERT_TRUE(RunOne(arena, s, 10, RandomTokens(m, 5, rng), &o).ok());
  EXPECT_EQ(s.cache->length(), 15);
  EXPECT_EQ(s.cache->sink_len(), 15);
  EXPECT_EQ(s.cache->k().win_len, 0);
  ExpectCacheMatchesHistory(s, DequantizeCache(*s.cache, arena.data()));
  s.cache->Release(arena);
  EXPECT_EQ(arena.live_allocations(), 0);
}

TEST(Bytes, LayoutMatchesTheTableBitsPerElement) {
  // D = 128, G = 32, fp16 scales: the body's bits per element for K and V.
  struct Want {
    Preset p;
    double k, v;
  };
  // innerq: the table's "3.0 (+zeros of asym V groups)": the hybrid V always stores a zero slot,
  // so 3-bit sym K 3.5 and 2-bit hybrid V 3.0 average 3.25; innerq2 averages 3.0.
  for (const Want& w : {Want{Preset::kKivi2, 3.0, 3.0}, Want{Preset::kKivi4, 5.0, 5.0},
                        Want{Preset::kInnerQ, 3.5, 3.0}, Want{Preset::kInnerQ2, 3.0, 3.0},
                        Want{Preset::kInnerQBase, 3.5, 3.5}}) {
    const QuantConfig c = PresetConfig(w.p);
    for (int hkv : {1, 8}) {
      const double per_page = double(kPageTokens) * hkv * 128;
      EXPECT_DOUBLE_EQ(MakeStreamLayout(c.k, hkv, 128).quant_page_bytes * 8 / per_page, w.k) << PresetName(w.p);
      EXPECT_DOUBLE_EQ(MakeStreamLayout(c.v, hkv, 128).quant_page_bytes * 8 / per_page, w.v) << PresetName(w.p);
    }
  }
}

TEST(Bytes, ReportedBytesAreTheLivePages) {
  Model m;
  m.d = 128;
  for (Preset p : AllPresets()) {
    HostArena arena(256 << 20);
    Seq s(m, PresetConfig(p));
    std::mt19937_64 rng(600);
    std::vector<uint16_t> o;
    ASSERT_TRUE(RunOne(arena, s, 0, RandomTokens(m, 600, rng), &o).ok());
    for (int i = 0; i < 96; ++i) {
      ASSERT_TRUE(RunOne(arena, s, s.cache->length(), RandomTokens(m, 1, rng), &o).ok());
      ASSERT_EQ(s.cache->bytes().total(), arena.live_bytes()) << PresetName(p);
    }
    const CacheBytes b = s.cache->bytes();
    const double bits = double(b.total()) * 8 / (double(s.cache->length()) * m.hkv * m.d * 2);
    // The whole-cache figure includes windows, sink and the last pages' slack.
    RecordProperty(std::string("bits_per_element_") + PresetName(p), std::to_string(bits));
    if (p != Preset::kFp16) {
      EXPECT_LT(bits, 16.0) << PresetName(p);
    }
    if (p == Preset::kFp16) {
      EXPECT_GE(bits, 16.0);
    }
    s.cache->Release(arena);
    EXPECT_EQ(arena.live_bytes(), 0);
  }
}

// The flush after the attention (LayerCache::PlanFlushAfter / CommitFlushAfter, as the store runs
// it with --flush_after): every preset gives bit-identical outputs with and without it over a
// prefill, decode steps that cross every flush phase, a 3-token chunk and two retries (one inside
// the pre-written flush's tokens), and the stored cache matches the history; the reference skips
// a step's flush that is marked done, so a wrong page or count here shows as wrong content.
TEST(FlushAfter, StepsMatchWithoutIt) {
  Model m;
  for (Preset p : AllPresets()) {
    SCOPED_TRACE(PresetName(p));
    HostArena arena(64 << 20);
    Seq a(m, PresetConfig(p)), b(m, PresetConfig(p));
    std::mt19937_64 rng(900 + static_cast<int>(p));
    std::vector<uint16_t> oa, ob;
    int done_steps = 0;
    auto step = [&](int32_t pos, int n) {
      const Tokens t = RandomTokens(m, n, rng);
      StepPlan probe;  // what the step is about to do (planned, then dropped)
      ASSERT_TRUE(a.cache->Plan(pos, n, arena, &probe).ok());
      done_steps += probe.work.flush_done ? 1 : 0;
      if (probe.work.flush_done) {
        EXPECT_EQ(pos, a.cache->length());
        EXPECT_TRUE(probe.work.flush_k > 0 || probe.work.flush_v > 0);
      }
      LayerCache::Abort(&probe, arena);
      Result r = RunOne(arena, a, pos, t, &oa, 0.f, 0, /*flush_after=*/true);
      ASSERT_TRUE(r.ok()) << r.message;
      r = RunOne(arena, b, pos, t, &ob, 0.f, 0, false);
      ASSERT_TRUE(r.ok()) << r.message;
      ASSERT_EQ(a.cache->length(), b.cache->length());
      ASSERT_EQ(oa, ob) << "step at " << pos;
    };
    step(0, 300);
    for (int i = 0; i < 140 && !HasFatalFailure(); ++i) {
      const int32_t len = a.cache->length();
      if (i == 50) step(len, 3);
      else if (i == 70) step(len - 1, 1);  // a retry of the last step: its flush is not the pending one
      else step(len, 1);
    }
    if (HasFatalFailure()) return;
    // a retry into the tokens whose flush was written: they are still in the window
    const int32_t back = std::max(a.cache->min_position(), a.cache->length() - 2);
    step(back, 1);
    step(a.cache->length(), 1);
    if (HasFatalFailure()) return;
    if (PresetConfig(p).k.quantized()) {
      EXPECT_GT(done_steps, 100) << "most decode steps find their flush done";
    } else {
      EXPECT_EQ(done_steps, 0) << "nothing to flush";
    }
    ExpectCacheMatchesHistory(a, DequantizeCache(*a.cache, arena.data()));
    a.cache->Release(arena);
    b.cache->Release(arena);
    EXPECT_EQ(arena.live_allocations(), 0);
    EXPECT_EQ(arena.Check(), "");
  }
}

// What the next step finds after a flush after the attention: the flush marked done, no body page
// of its own (the flush's pages are the cache's), the key-norm factors the flush computed (their
// page allocated once), and after a truncating plan no mark; an aborted flush holds no pages.
TEST(FlushAfter, NextStepUsesTheWrittenFlush) {
  Model m;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kInnerQ));
  std::mt19937_64 rng(910);
  std::vector<uint16_t> o;
  const Tokens pre = RandomTokens(m, 400, rng);
  ASSERT_TRUE(RunOne(arena, s, 0, pre, &o, 0.f, 0, true).ok());
  // the prefill's pending flush (the first quantized block) is written, factors included
  EXPECT_TRUE(s.cache->flush_written());
  EXPECT_FALSE(s.cache->norm_ready());
  ASSERT_GE(s.cache->norm_offset(), 0);
  const int64_t norm = s.cache->norm_offset();
  const size_t body_pages = s.cache->k().body_pages.size();
  EXPECT_GE(body_pages, size_t{3});  // 400 - 32 - 96 keys
  StepPlan plan;
  ASSERT_TRUE(s.cache->Plan(400, 1, arena, &plan).ok());
  EXPECT_TRUE(plan.work.flush_done);
  EXPECT_TRUE(plan.work.compute_norm);
  EXPECT_EQ(plan.work.norm_offset, norm);
  EXPECT_EQ(plan.k_body.size(), body_pages) << "the flush's pages are already the cache's";
  LayerCache::Abort(&plan, arena);
  ASSERT_TRUE(s.cache->Plan(399, 1, arena, &plan).ok());  // truncating: flushes again
  EXPECT_FALSE(plan.work.flush_done);
  EXPECT_EQ(plan.work.norm_offset, norm);
  LayerCache::Abort(&plan, arena);
  ASSERT_TRUE(RunOne(arena, s, 400, RandomTokens(m, 1, rng), &o, 0.f, 0, true).ok());
  EXPECT_TRUE(s.cache->norm_ready());
  EXPECT_EQ(s.cache->norm_offset(), norm);
  // the factors: from the prefill keys outside sink and window, as without the flush after
  const float* f = reinterpret_cast<const float*>(arena.data() + norm);
  for (int h = 0; h < m.hkv; ++h)
    for (int c = 0; c < m.d; ++c) {
      float mx = 0;
      for (int t = 32; t < 400 - 96; ++t)
        mx = std::max(mx, std::fabs(LoadAct(&pre.k[(size_t(t) * m.hkv + h) * m.d + c], m.dtype)));
      ASSERT_EQ(f[h * m.d + c], KeyNormFactor(mx));
    }
  // a flush planned and aborted holds nothing and leaves no mark
  StepPlan step, flush;
  ASSERT_TRUE(s.cache->Plan(s.cache->length(), 40, arena, &step).ok());
  const int64_t before = arena.live_bytes();
  ASSERT_TRUE(s.cache->PlanFlushAfter(step, arena, &flush).ok());
  EXPECT_GT(flush.work.flush_k, 0);
  EXPECT_EQ(flush.work.n_new, 0);
  LayerCache::Abort(&flush, arena);
  EXPECT_EQ(arena.live_bytes(), before);
  LayerCache::Abort(&step, arena);
  s.cache->Release(arena);
  EXPECT_EQ(arena.live_allocations(), 0);
}

// A flush after that the pool (or the quota) cannot hold: refused with no page held and no flush
// in its work; the step commits without it and the next step flushes as usual.
TEST(FlushAfter, PoolExhaustionLeavesTheFlushToTheNextStep) {
  Model m;
  HostArena arena(64 << 20);
  Seq s(m, PresetConfig(Preset::kKivi2));
  std::mt19937_64 rng(920);
  std::vector<uint16_t> o;
  ASSERT_TRUE(RunOne(arena, s, 0, RandomTokens(m, 127, rng), &o).ok());
  // the step to 128 tokens leaves K's window at keep 0 + flush 128: its flush is pending (V keeps 128)
  StepPlan step, flush;
  ASSERT_TRUE(s.cache->Plan(127, 1, arena, &step).ok());
  struct Refuse : PageAllocator {
    bool Allocate(int64_t, int64_t*) override { return false; }
    void Free(int64_t, int64_t) override {}
  } refuse;
  const int64_t live = arena.live_bytes();
  const Result r = s.cache->PlanFlushAfter(step, refuse, &flush);
  EXPECT_EQ(r.code, Code::kResourceExhausted);
  EXPECT_EQ(flush.work.flush_k, 0);
  EXPECT_EQ(flush.work.flush_v, 0);
  EXPECT_EQ(flush.work.n_new, 0);
  EXPECT_TRUE(flush.new_pages.empty());
  EXPECT_EQ(arena.live_bytes(), live);
  // with pages it plans both flushes (the step itself is not run here)
  ASSERT_TRUE(s.cache->PlanFlushAfter(step, arena, &flush).ok());
  EXPECT_EQ(flush.work.flush_k, 128);
  EXPECT_EQ(flush.work.flush_v, 0);  // V keeps 128
  LayerCache::Abort(&flush, arena);
  LayerCache::Abort(&step, arena);
  EXPECT_EQ(arena.live_bytes(), live);
  // run the step without a flush after: the next step plans the flush itself
  ASSERT_TRUE(RunOne(arena, s, 127, RandomTokens(m, 1, rng), &o).ok());
  EXPECT_FALSE(s.cache->flush_written());
  ASSERT_TRUE(s.cache->Plan(128, 1, arena, &step).ok());
  EXPECT_FALSE(step.work.flush_done);
  EXPECT_EQ(step.work.flush_k, 128);
  LayerCache::Abort(&step, arena);
  s.cache->Release(arena);
  EXPECT_EQ(arena.live_allocations(), 0);
}

TEST(Arena, GuardBandsCatchOverruns) {
  HostArena arena(1 << 16);
  int64_t a, b;
  ASSERT_TRUE(arena.Allocate(100, &a));
  ASSERT_TRUE(arena.Allocate(64, &b));
  EXPECT_EQ(a % 16, 0);
  EXPECT_EQ(b % 16, 0);
  EXPECT_EQ(arena.Check(), "");
  arena.data()[a + 112] = 0;  // first guard byte after the (rounded) 112 bytes
  EXPECT_NE(arena.Check(), "");
  HostArena arena2(1 << 16);
  ASSERT_TRUE(arena2.Allocate(64, &a));
  arena2.Free(a, 64);
  EXPECT_EQ(arena2.Check(), "");
  arena2.Free(a, 64);
  EXPECT_NE(arena2.Check(), "") << "double free";
  int64_t c;
  EXPECT_FALSE(arena2.Allocate(1 << 20, &c));
}

}  // namespace
}  // namespace testing
}  // namespace kvq
