// The CUDA quantize-append run on the CPU: the batch flattened and planned by the runner's own
// FlattenBatch / PlanQuantizeAppend, then every block of KeyNormKernel and QuantizeAppendKernel on
// each of its grids (one group per warp or per lane, K and V with their own block counts or one)
// (their bodies, kernels/cuda/quantize_append.cuh, the code the kernels run) executed on
// emulated threads (tests/kernels/warp_emu.h: each block's 256 threads as fibers, warp operations
// and the block barrier emulated) over a real arena. After each step the whole arena must be
// byte-identical to CpuQuantizeAppend's on the same input: flushed codes, scales and zeros,
// key-norm factors, appended sink and window rows, untouched bytes and guard bands. What only a
// GPU checks: the launch itself and the attention kernels (kernels_gpu_test).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvq/reference.h"
#include "scenario.h"
#include "warp_emu.h"
#include "quantize_append.cuh"

namespace kvq {
namespace {

using testing::Arena;
using testing::TSeq;
using testing::Fmt;
using testing::TStep;

struct SeqCase {
  QuantConfig cfg;
  int L0, win_first;
  std::vector<int> n_new;  // tokens appended per step
};

// Runs the steps of a batch through the emulated kernels and the reference; compares the arenas.
// Some step must flush along_tokens groups of 32 (the lane instance). grids_differ: some step must
// give K and V different block counts, and some step's lane plan fewer blocks than the per-warp
// one. head_steps: some step must run as one block per (sequence, KV head) (QaHeadFits), and at
// D = 128 some step must give one of its warps two flush groups.
void CheckBatch(const std::vector<SeqCase>& cases, DType dt, int hkv, int d, uint32_t seed, bool grids_differ = false,
                bool head_steps = false) {
  std::mt19937 rng(seed);
  Arena a;
  std::vector<TSeq> seqs;
  for (const SeqCase& c : cases) {
    seqs.push_back(testing::MakeSeq(a, c.cfg, hkv, d, dt, c.L0, c.win_first, rng));
    testing::FillEdgeWindow(a, seqs.back(), hkv, d, dt, rng);
  }
  const size_t num_steps = cases[0].n_new.size();
  int blocks_run = 0, traced_flushing_warps = 0, lane_steps = 0, fewer_chunks = 0, split_steps = 0, head_runs = 0,
      two_group_warps = 0;
  for (size_t step = 0; step < num_steps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    std::vector<TStep> steps;
    std::vector<SeqWork> works;
    std::vector<QuantConfig> cfgs;
    int64_t rows = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const int n = cases[i].n_new[step];
      steps.push_back(testing::PlanStep(a, seqs[i], hkv, d, n, rows, rows));
      rows += n;
    }
    for (TStep& st : steps) {
      st.Point();
      works.push_back(st.w);
      cfgs.push_back(st.next.cfg);
    }
    const int n = static_cast<int>(seqs.size());
    const std::vector<uint16_t> kn = testing::RandomActs(rows * hkv * d, dt, rng, 2.f);
    const std::vector<uint16_t> vn = testing::RandomActs(rows * hkv * d, dt, rng, 1.f);
    std::vector<uint16_t> q(size_t(rows) * hkv * d + 1, 0), o(size_t(rows) * hkv * d + 1, 0);
    StepParams p;
    p.num_q_heads = hkv;
    p.num_kv_heads = hkv;
    p.head_dim = d;
    p.dtype = dt;
    p.q = q.data();
    p.o = o.data();
    p.k_new = kn.data();
    p.v_new = vn.data();

    std::vector<uint8_t> ref = a.bytes();
    const Result r = CpuQuantizeAppend(p, works.data(), cfgs.data(), n, ref.data(), 1);
    ASSERT_TRUE(r.ok()) << r.message;

    std::vector<cuda::DevSeq> ds;
    std::vector<int64_t> pages;
    bool ready = false;
    const Result fr = cuda::FlattenBatch(p, works.data(), cfgs.data(), n, &ds, &pages, &ready);
    ASSERT_TRUE(fr.ok()) << fr.message;
    // The launch's grids: one group per warp with K's and V's own block counts (QaPlan), then with
    // one count for both (the fused step's, set_qa_split_chunks(false)); where some along_tokens
    // groups of 32 are flushed, one group per lane on the lane plan's counts and on one block per
    // tensor (each warp then walks many 32-group tasks); where the step allows, one block per
    // (sequence, KV head) (QuantizeAppendHeadBlock, DevQaHead).
    const cuda::QaPlan warp_plan = cuda::PlanQuantizeAppend(ds, d, -1);
    std::vector<cuda::DevQaHead> heads;
    if (cuda::QaHeadFits(ds, d)) cuda::BuildQaHeads(ds, pages, d, &heads);
    const cuda::QaPlan lane_plan = cuda::PlanQuantizeAppend(ds, d, 0);
    EXPECT_FALSE(warp_plan.lanes);
    EXPECT_EQ(warp_plan.chunks, std::max(warp_plan.k_chunks, warp_plan.v_chunks));
    split_steps += warp_plan.k_chunks != warp_plan.v_chunks ? 1 : 0;
    for (int variant = 0; variant < 5; ++variant) {
      const bool lanes = variant == 2 || variant == 3;
      const bool head = variant == 4;
      if (lanes && !lane_plan.lanes) continue;
      if (head) {
        const cuda::QaPlan hp = cuda::PlanQuantizeAppend(ds, d, -1, true);
        EXPECT_EQ(hp.head, cuda::QaHeadFits(ds, d) && !hp.key_norm);
        if (!hp.head) continue;
        EXPECT_EQ(cuda::QaPlanBlocks(hp, n, hkv), int64_t{n} * hkv);
        ++head_runs;
        for (size_t i = 0; i < ds.size(); ++i)
          two_group_warps += heads[2 * i].groups + heads[2 * i + 1].groups > cuda::kQaHeadWarps ? 1 : 0;
      }
      SCOPED_TRACE(variant == 0   ? "groups per warp"
                   : variant == 1 ? "groups per warp, one count"
                   : variant == 2 ? "groups per lane"
                   : variant == 3 ? "groups per lane, one block per tensor"
                                  : "one block per head");
      cuda::QaPlan plan = lanes ? lane_plan : warp_plan;
      if (variant == 1) plan.k_chunks = plan.v_chunks = plan.chunks;
      if (variant == 3) plan.k_chunks = plan.v_chunks = 1;
      if (variant == 2) {
        lane_steps++;
        EXPECT_LE(plan.k_chunks + plan.v_chunks, warp_plan.k_chunks + warp_plan.v_chunks);
        fewer_chunks += plan.k_chunks + plan.v_chunks < warp_plan.k_chunks + warp_plan.v_chunks ? 1 : 0;
      }
      plan.head = head;
      const int grid_z = plan.k_chunks + plan.v_chunks;
      std::vector<uint8_t> emu = a.bytes();
      int32_t flag = 0;
      cuda::QaArgs qa{};
      qa.arena = emu.data();
      qa.seqs = ds.data();
      qa.pages = pages.data();
      qa.k_new = kn.data();
      qa.v_new = vn.data();
      qa.num_kv_heads = hkv;
      qa.head_dim = d;
      qa.dtype = static_cast<int32_t>(dt);
      qa.error_flag = &flag;
      qa.k_chunks = plan.k_chunks;
      // Odd steps run with the benchmark's phase trace on: the codes must not change, and every warp
      // writes its stamps in order.
      const bool trace = step % 2 == 1;
      const int64_t trace_warps = cuda::QaPlanTraceWarps(plan, n, hkv);
      std::vector<int64_t> stamps(trace ? trace_warps * cuda::kQaTraceSlots : 0, -1);
      qa.trace = trace ? stamps.data() : nullptr;
      if (plan.key_norm)  // KeyNormKernel: no warp operations, its threads run one after the other
        for (int s = 0; s < n; ++s)
          for (int h = 0; h < hkv; ++h)
            for (int tid = 0; tid < cuda::kQaThreads; ++tid) cuda::KeyNormBlock(qa, s, h, tid, cuda::kQaThreads);
      for (int s = 0; s < n && head; ++s)
        for (int h = 0; h < hkv; ++h, ++blocks_run) {
          std::vector<float> err(size_t(cuda::kQaHeadWarps) * 2 * kMaxGroupSize, std::nanf(""));
          cuda::warp::RunBlock(cuda::kQaHeadWarps * 32, [&](int tid) {
            float* werr = err.data() + (tid >> 5) * 2 * kMaxGroupSize;
            const int64_t tb = int64_t{s} * hkv + h;
            if (plan.hybrid) {  // the kernel's instance for steps with hybrid flushes
              trace ? cuda::QuantizeAppendHeadBlock<true, true>(qa, heads.data(), s, h, tid, werr, tb)
                    : cuda::QuantizeAppendHeadBlock<false, true>(qa, heads.data(), s, h, tid, werr, tb);
            } else {
              trace ? cuda::QuantizeAppendHeadBlock<true, false>(qa, heads.data(), s, h, tid, werr, tb)
                    : cuda::QuantizeAppendHeadBlock<false, false>(qa, heads.data(), s, h, tid, werr, tb);
            }
          });
        }
      for (int s = 0; s < n && !head; ++s)
        for (int h = 0; h < hkv; ++h)
          for (int z = 0; z < grid_z; ++z, ++blocks_run) {
            const int warp_floats = cuda::QaWarpFloats(lanes);
            std::vector<float> err(size_t(cuda::kQaWarps) * warp_floats, std::nanf(""));
            cuda::warp::RunBlock(cuda::kQaThreads, [&](int tid) {
              float* werr = err.data() + (tid >> 5) * warp_floats;
              if (trace && lanes) {
                cuda::QuantizeAppendGridBlock<true, true>(qa, s, h, z, grid_z, tid, werr);
              } else if (trace) {
                cuda::QuantizeAppendGridBlock<true, false>(qa, s, h, z, grid_z, tid, werr);
              } else if (lanes) {
                cuda::QuantizeAppendGridBlock<false, true>(qa, s, h, z, grid_z, tid, werr);
              } else {
                cuda::QuantizeAppendGridBlock<false, false>(qa, s, h, z, grid_z, tid, werr);
              }
            });
          }
      EXPECT_EQ(flag, 0) << "the emulated kernel reported a bad value";
      for (int64_t w = 0; trace && w < trace_warps; ++w) {
        const int64_t* t = stamps.data() + w * cuda::kQaTraceSlots;
        SCOPED_TRACE("trace warp " + std::to_string(w));
        ASSERT_GT(t[0], 0);
        EXPECT_LE(t[1], t[2]);
        EXPECT_LE(t[2], t[6]);
        EXPECT_LE(t[0], t[7]);
        EXPECT_EQ(t[8], 0);
        ASSERT_GE(t[9], 0);
        if (t[9] > 0) {  // the first group's stamps, in order
          ++traced_flushing_warps;
          EXPECT_LE(t[2], t[3]);
          EXPECT_LE(t[3], t[4]);
          EXPECT_LE(t[4], t[5]);
          EXPECT_LE(t[5], t[6]);
        } else {
          EXPECT_EQ(t[3], -1);
        }
      }
      int64_t diffs = 0, first = -1;
      for (size_t i = 0; i < emu.size(); ++i)
        if (emu[i] != ref[i]) {
          if (first < 0) first = int64_t(i);
          ++diffs;
        }
      ASSERT_EQ(diffs, 0) << "emulated quantize-append differs from the reference in " << diffs
                          << " bytes, first at " << first << " (" << plan.k_chunks << " + " << plan.v_chunks
                          << " blocks)";
    }
    a.bytes() = ref;
    for (size_t i = 0; i < seqs.size(); ++i) seqs[i] = steps[i].next;
  }
  EXPECT_GT(blocks_run, 0);
  EXPECT_GT(traced_flushing_warps, 0);
  EXPECT_GT(lane_steps, 0) << "no step flushed along_tokens groups of 32";
  if (head_steps) {
    EXPECT_GE(head_runs, 2) << "no step ran as one block per head";
    if (d == 128) {
      EXPECT_GT(two_group_warps, 0) << "no step gave a warp of the block per head two flush groups";
    }
  }
  if (grids_differ) {
    EXPECT_GT(split_steps, 0) << "no step gave K and V different block counts";
    EXPECT_GT(fewer_chunks, 0) << "no step's lane flush needed fewer blocks";
  }
}

// Presets in one batch (different configs per sequence, as the store batches sessions), fp16 and
// bf16: the first step flushes the initial windows (large flushes: many chunks; key-norm factors
// computed), the next steps append 1-2 tokens each and flush at the presets' rates.
TEST(QuantizeAppendEmulation, PresetBatchesMatchTheReference) {
  for (DType dt : {DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dt));
    std::vector<SeqCase> cases;
    const std::vector<int> steps = {1, 1, 2, 1};
    cases.push_back({PresetConfig(Preset::kInnerQ), 300, 5, steps});
    cases.push_back({PresetConfig(Preset::kKivi2), 260, 0, steps});
    cases.push_back({PresetConfig(Preset::kInnerQ2), 20, 0, steps});  // sink not full yet
    cases.push_back({PresetConfig(Preset::kFp16), 40, 100, steps});
    cases.push_back({PresetConfig(Preset::kInnerQBase), 161, 127, steps});
    cases.push_back({PresetConfig(Preset::kKivi4), 129, 1, steps});
    CheckBatch(cases, dt, 2, 64, 31 + static_cast<uint32_t>(dt));
    if (HasFatalFailure()) return;
  }
}

// Decode steps of one token (the steps one block per (sequence, KV head) covers): the presets in one
// batch, the sink filling up (innerq2 from 20 tokens), the first key-norm step and the along_tokens
// flushes in between going to the grid, and a config that flushes K and V along channels every step
// (at D = 128 eight groups: two for each of the block's warps), D = 128 and 64, fp16 and bf16.
TEST(QuantizeAppendEmulation, OneBlockPerHeadMatchesTheReference) {
  for (DType dt : {DType::kF16, DType::kBF16}) {
    for (int d : {128, 64}) {
      SCOPED_TRACE(std::string(DTypeName(dt)) + " D=" + std::to_string(d));
      const std::vector<int> steps(36, 1);
      std::vector<SeqCase> cases;
      cases.push_back({PresetConfig(Preset::kInnerQ), 300, 5, steps});
      cases.push_back({PresetConfig(Preset::kKivi2), 250, 0, steps});
      cases.push_back({PresetConfig(Preset::kInnerQ2), 20, 0, steps});
      cases.push_back({PresetConfig(Preset::kFp16), 40, 100, steps});
      cases.push_back({PresetConfig(Preset::kKivi4), 129, 1, steps});
      QuantConfig both;
      both.k = Fmt(QuantMode::kSym, 3, Grouping::kAlongChannels, 32, 4, 1);
      both.v = Fmt(QuantMode::kHybrid, 2, Grouping::kAlongChannels, 32, 3, 1);
      both.sink = 2;
      ASSERT_EQ(ValidateConfig(both, d), "");
      cases.push_back({both, 60, 7, steps});
      CheckBatch(cases, dt, 2, d, 101 + static_cast<uint32_t>(dt) + d, false, true);
      if (HasFatalFailure()) return;
    }
  }
}

// G = 64 / 128, every mode, odd sinks, key normalization, D = 128; a decode run long enough for
// along_tokens flushes to come back.
TEST(QuantizeAppendEmulation, CustomConfigsMatchTheReference) {
  QuantConfig a;
  a.k = Fmt(QuantMode::kHybrid, 3, Grouping::kAlongChannels, 64, 3, 1);
  a.v = Fmt(QuantMode::kAsym, 4, Grouping::kAlongTokens, 128, 5, 128);
  a.sink = 4;
  a.key_norm = true;
  QuantConfig b;
  b.k = Fmt(QuantMode::kSym, 2, Grouping::kAlongTokens, 64, 0, 64);
  b.v = Fmt(QuantMode::kHybrid, 4, Grouping::kAlongChannels, 128, 2, 3);
  QuantConfig c;
  c.k = Fmt(QuantMode::kHybrid, 2, Grouping::kAlongTokens, 32, 1, 32);
  c.v = Fmt(QuantMode::kSym, 3, Grouping::kAlongChannels, 32, 0, 1);
  c.sink = 7;
  c.key_norm = true;
  ASSERT_EQ(ValidateConfig(a, 128), "");
  ASSERT_EQ(ValidateConfig(b, 128), "");
  ASSERT_EQ(ValidateConfig(c, 128), "");
  const std::vector<int> steps(40, 1);
  CheckBatch({{a, 300, 100, steps}, {b, 260, 3, steps}, {c, 90, 0, steps}}, DType::kF16, 2, 128, 77, true);
}

// The plan's rule for lanes: one group per lane only where the batch flushes at least the given
// number of along_tokens groups of 32 per KV head (summed over its sequences), and then the counts
// of those warp tasks; the rest of the plan as one group per warp would have it.
TEST(QuantizeAppendPlan, LanesOnlyFromTheGivenGroupCount) {
  const int d = 128;
  cuda::DevSeq s{};
  s.v.flush = 32;  // innerq's value flush: 32 tokens x 128 channels = 128 groups per head
  s.v.mode = static_cast<int32_t>(QuantMode::kHybrid);
  s.v.grouping = static_cast<int32_t>(Grouping::kAlongTokens);
  s.v.group_size = 32;
  s.k.flush = 1;  // innerq's key flush: 4 along_channels groups per head
  s.k.mode = static_cast<int32_t>(QuantMode::kSym);
  s.k.grouping = static_cast<int32_t>(Grouping::kAlongChannels);
  s.k.group_size = 32;
  const std::vector<cuda::DevSeq> batch(16, s);  // 2,048 such groups per KV head
  const cuda::QaPlan never = cuda::PlanQuantizeAppend(batch, d, -1);
  EXPECT_FALSE(never.lanes);
  EXPECT_EQ(never.chunks, 64);
  EXPECT_EQ(never.k_chunks, 2);
  EXPECT_EQ(never.v_chunks, 64);
  for (const int64_t min_groups : {int64_t{0}, int64_t{2048}}) {
    const cuda::QaPlan p = cuda::PlanQuantizeAppend(batch, d, min_groups);
    EXPECT_TRUE(p.lanes) << min_groups;
    EXPECT_EQ(p.chunks, 64);    // the fused step's count does not change
    EXPECT_EQ(p.k_chunks, 2);   // along_channels: one group per warp still
    EXPECT_EQ(p.v_chunks, 2);   // 4 warp tasks of 32 groups
  }
  const cuda::QaPlan below = cuda::PlanQuantizeAppend(batch, d, 2049);
  EXPECT_FALSE(below.lanes);
  EXPECT_EQ(below.v_chunks, 64);
  // hybrid: where a flushed tensor is hybrid (the per-head kernel's instance with the sums by four)
  EXPECT_TRUE(below.hybrid);
  std::vector<cuda::DevSeq> sym = batch;
  for (cuda::DevSeq& q : sym) q.v.mode = static_cast<int32_t>(QuantMode::kAsym);
  EXPECT_FALSE(cuda::PlanQuantizeAppend(sym, d, -1).hybrid);
  for (cuda::DevSeq& q : sym) q.v.flush = 0, q.k.mode = static_cast<int32_t>(QuantMode::kHybrid);
  EXPECT_TRUE(cuda::PlanQuantizeAppend(sym, d, -1).hybrid);
  for (cuda::DevSeq& q : sym) q.k.flush = 0, q.v.mode = static_cast<int32_t>(QuantMode::kHybrid);
  EXPECT_FALSE(cuda::PlanQuantizeAppend(sym, d, -1).hybrid) << "nothing flushed";
  // nothing flushed along tokens: no lanes, whatever the count
  std::vector<cuda::DevSeq> keys_only = batch;
  for (cuda::DevSeq& x : keys_only) x.v.flush = 0;
  EXPECT_FALSE(cuda::PlanQuantizeAppend(keys_only, d, 0).lanes);
}

// Which steps one block per (sequence, KV head) covers (QaHeadFits, and the plan's head):
// one new token or none, each tensor flushing nothing or one token of along_channels groups of 32,
// at most two groups per warp, no key-norm factors to compute.
TEST(QuantizeAppendPlan, OneBlockPerHeadOnlyWhereItFits) {
  cuda::DevSeq s{};  // innerq's every-step flush: one key token, 4 along_channels groups at D = 128
  s.n_new = 1;
  s.k.flush = 1;
  s.k.mode = static_cast<int32_t>(QuantMode::kSym);
  s.k.grouping = static_cast<int32_t>(Grouping::kAlongChannels);
  s.k.group_size = 32;
  s.v.mode = static_cast<int32_t>(QuantMode::kHybrid);
  s.v.grouping = static_cast<int32_t>(Grouping::kAlongTokens);
  s.v.group_size = 32;
  const std::vector<cuda::DevSeq> batch(16, s);
  EXPECT_TRUE(cuda::QaHeadFits(batch, 128));
  const cuda::QaPlan p = cuda::PlanQuantizeAppend(batch, 128, -1, true);
  EXPECT_TRUE(p.head);
  EXPECT_EQ(cuda::QaPlanBlocks(p, 16, 8), 16 * 8);
  EXPECT_EQ(cuda::QaPlanTraceWarps(p, 16, 8), 16 * 8 * cuda::kQaHeadWarps);
  EXPECT_FALSE(cuda::PlanQuantizeAppend(batch, 128, -1).head);  // not asked for
  auto fits_with = [&](auto change, int d) {
    std::vector<cuda::DevSeq> b = batch;
    change(b.back());
    return cuda::QaHeadFits(b, d);
  };
  // the value flush of 32 tokens along tokens (every 32nd step) goes to the grid
  EXPECT_FALSE(fits_with([](cuda::DevSeq& x) { x.v.flush = 32; }, 128));
  // fp16 values flush nothing that needs a quantizer
  EXPECT_TRUE(fits_with([](cuda::DevSeq& x) { x.v.flush = 32, x.v.mode = static_cast<int32_t>(QuantMode::kFull); }, 128));
  EXPECT_FALSE(fits_with([](cuda::DevSeq& x) { x.n_new = 2; }, 128));       // two new tokens
  EXPECT_TRUE(fits_with([](cuda::DevSeq& x) { x.n_new = 0; }, 128));        // the flush after the attention
  EXPECT_FALSE(fits_with([](cuda::DevSeq& x) { x.k.flush = 2; }, 128));     // two key tokens
  EXPECT_FALSE(fits_with([](cuda::DevSeq& x) { x.k.group_size = 64; }, 128));
  EXPECT_FALSE(fits_with([](cuda::DevSeq& x) { x.compute_norm = x.key_norm = 1; }, 128));
  EXPECT_TRUE(fits_with([](cuda::DevSeq& x) { x.key_norm = 1; }, 128));     // factors already there
  // K and V both along channels: 8 groups at D = 128 (two per warp), 16 at D = 256 (too many)
  auto both = [](cuda::DevSeq& x) {
    x.v.flush = 1;
    x.v.grouping = static_cast<int32_t>(Grouping::kAlongChannels);
  };
  EXPECT_TRUE(fits_with(both, 128));
  EXPECT_TRUE(fits_with(both, 64));
  EXPECT_FALSE(fits_with(both, 256));
  EXPECT_TRUE(cuda::QaHeadFits(batch, 256));  // one key token at D = 256: 8 groups
}

}  // namespace
}  // namespace kvq
