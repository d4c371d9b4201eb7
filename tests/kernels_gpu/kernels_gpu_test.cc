// GPU kernels against the CPU reference on the same arena: pages byte-identical after
// quantize-append (codes, scales, zeros, window and sink), attention by normalized error, NaN
// fails, guard bands around every page and around the output catch out-of-bounds writes.
// Without a CUDA device every test is skipped visibly (GTEST_SKIP), never passed.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kvq/cuda_ops.h"
#include "kvq/reference.h"
#include "scenario.h"

#if defined(KVQ_EMU_SUITE)
namespace kvq_emu {
uint64_t PdlEarlyLaunches();  // tests/emu/cuda_emu_runtime.cc
uint64_t FloatMmas();          // tests/emu/cuda_emu_runtime.cc
}  // namespace kvq_emu
#endif

namespace kvq {
namespace {

using testing::Arena;
using testing::TSeq;
using testing::Fmt;
using testing::TStep;

// A step's shape and its q / k_new / v_new / o (device pointers for RunStep, host pointers for
// RunStepFromHost).
StepParams Params(int hq, int hkv, int d, DType dt, const void* q, const void* k, const void* v, void* o) {
  StepParams p;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.dtype = dt;
  p.q = q;
  p.k_new = k;
  p.v_new = v;
  p.o = o;
  return p;
}

#define SKIP_WITHOUT_GPU() \
  if (!testing::HaveCudaDevice()) GTEST_SKIP() << "no CUDA device: GPU kernel test not run"

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

struct SeqSpec {
  SeqSpec(Preset p, int l0, int a, int b, int wf)
      : config(PresetConfig(p)), name(PresetName(p)), L0(l0), n1(a), n2(b), win_first(wf) {}
  SeqSpec(const QuantConfig& c, int l0, int a, int b, int wf)
      : config(c), name("custom"), L0(l0), n1(a), n2(b), win_first(wf) {}
  QuantConfig config;
  std::string name;
  int L0;         // tokens before the first step
  int n1;         // tokens appended by the first step
  int n2;         // tokens appended by the second step
  int win_first;  // window start slot in its first page
};

struct Case {
  int hq = 8, hkv = 2, d = 128;
  DType dt = DType::kF16;
  std::vector<SeqSpec> seqs;
  uint32_t seed = 1;
  int expect_decode = -1;  // 1: the plan must take the decode fast path, 0: the generic kernel
  int expect_imma = -1;    // 1: body tiles must run on the tensor cores (decode_imma.cuh), 0: must not
  int expect_mma = -1;     // 1: the fp16 batch must run on the tensor cores (decode_mma.cuh), 0: must not
  bool imma = true;        // CudaStepRunner::set_imma
  int kivi_min_tokens = -1;  // CudaStepRunner::set_kivi_mma_min_unit_tokens
  int split_blocks = 0;      // CudaStepRunner::set_split_blocks
  float q_scale = 1.f;       // query magnitude: large values make the softmax nearly one-hot
  int ring_stages = 0;       // CudaStepRunner::set_ring_stages (0: the plan's choice); checked from step 2
  int expect_stages = 0;     // with ring_stages 0: the plan's ring depth (0: not checked); from step 2
  bool kivi_codes = false;   // CudaStepRunner::set_kivi_codes (off: the dequantizing KIVI units)
  int expect_kivi_codes = -1;  // 1: the KIVI body units must multiply the codes (decode_kivi_codes.cuh)
  int min_row_class = 1;       // CudaStepRunner::set_min_row_class; checked when above 1
  int ring_offset = 0;         // CudaStepRunner::set_ring_offset
  bool page_units = true;      // CudaStepRunner::set_page_units
  int page_min_pages = -1;     // CudaStepRunner::set_page_min_pages (0: wherever they fit; -1: its default)
  int expect_pages = -1;       // 1: InnerQ body pages must run in page units (decode_pages.cuh), 0: must not
  bool mma_tiles = true;       // CudaStepRunner::set_mma_tiles
  int bodies_first = -1;       // CudaStepRunner::set_bodies_first (-1: the plan's rule)
};

std::string Describe(const Case& c) {
  std::ostringstream os;
  os << "Hq=" << c.hq << " Hkv=" << c.hkv << " D=" << c.d << " " << DTypeName(c.dt) << " seqs:";
  for (const auto& s : c.seqs) os << " " << s.name << "/L0=" << s.L0 << "/n=" << s.n1 << "," << s.n2;
  return os.str();
}

// The case's sequences, drawn into the arena (testing::MakeSeq per SeqSpec).
std::vector<TSeq> MakeCaseSeqs(const Case& c, Arena& a, std::mt19937& rng) {
  std::vector<TSeq> seqs;
  for (const auto& sp : c.seqs) seqs.push_back(testing::MakeSeq(a, sp.config, c.hkv, c.d, c.dt, sp.L0, sp.win_first, rng));
  return seqs;
}

float Threshold(DType dt) { return dt == DType::kF16 ? 2e-3f : 8e-3f; }

// Runs one batched step on CPU and GPU from the same arena; compares everything. Returns the
// next states (the arena `a` holds the CPU result afterwards).
//
// flush_written (non-null: the next step's flush after this step's attention, RunStep's
// flush_after): in, whether this step's flush is already in the arena (flush_done; written by the
// previous call, whose states carry the body pages it wrote); out, whether the runner launched the
// flush-only batch of the states after this step (n_new = 0) as the attention's programmatic
// dependent (stats().flush_after: not after a fused step), and then the reference runs the same
// flush after its attention.
void RunAndCompare(const Case& c, Arena& a, std::vector<TSeq>* seqs, bool first, std::mt19937& rng,
                   CudaStepRunner& runner, bool* flush_written = nullptr) {
  const bool flush_after = flush_written != nullptr;
  const int n = static_cast<int>(seqs->size());
  std::vector<TStep> steps, flushes;
  std::vector<SeqWork> works, flush_works;
  std::vector<QuantConfig> cfgs;
  int64_t rows = 0;
  for (int i = 0; i < n; ++i) {
    const int nn = first ? c.seqs[i].n1 : c.seqs[i].n2;
    steps.push_back(testing::PlanStep(a, (*seqs)[i], c.hkv, c.d, nn, rows, rows));
    rows += nn;
  }
  for (auto& s : steps) {
    s.Point();
    works.push_back(s.w);
    works.back().flush_done = flush_after && *flush_written;
    cfgs.push_back(s.next.cfg);
  }
  if (flush_after) {
    // the next step's flush, planned on the state after this one: its body pages become that
    // state's (the next step plans the same flush into them), its counts stay pending
    for (auto& s : steps) flushes.push_back(testing::PlanStep(a, s.next, c.hkv, c.d, 0, 0, 0));
    for (int i = 0; i < n; ++i) {
      flushes[size_t(i)].Point();
      flush_works.push_back(flushes[size_t(i)].w);
    }
  }
  const int64_t qn = rows * c.hq * c.d, kvn = rows * c.hkv * c.d;
  const std::vector<uint16_t> q = testing::RandomActs(qn, c.dt, rng, c.q_scale);
  const std::vector<uint16_t> kn = testing::RandomActs(kvn, c.dt, rng, 2.f);
  const std::vector<uint16_t> vn = testing::RandomActs(kvn, c.dt, rng, 1.f);
  constexpr int64_t kOutGuard = 256;  // uint16 sentinel elements after the output
  constexpr uint16_t kOutSentinel = 0x7E01;

  // GPU first, from the untouched arena.
  std::vector<uint8_t>& host = a.bytes();
  DevBuf<uint8_t> d_arena(host.size());
  DevBuf<uint16_t> d_q(qn), d_k(kvn), d_v(kvn), d_o(qn + kOutGuard);
  ASSERT_TRUE(d_arena.p && d_q.p && d_k.p && d_v.p && d_o.p);
  CUDA_OK(cudaMemcpy(d_arena.p, host.data(), host.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_q.p, q.data(), qn * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_k.p, kn.data(), kvn * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_v.p, vn.data(), kvn * 2, cudaMemcpyHostToDevice));
  std::vector<uint16_t> o_init(qn + kOutGuard, kOutSentinel);
  CUDA_OK(cudaMemcpy(d_o.p, o_init.data(), o_init.size() * 2, cudaMemcpyHostToDevice));
  const StepParams gp = Params(c.hq, c.hkv, c.d, c.dt, d_q.p, d_k.p, d_v.p, d_o.p);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  Result r = runner.RunStep(gp, works.data(), cfgs.data(), n, d_arena.p, stream,
                             flush_after ? flush_works.data() : nullptr);
  ASSERT_TRUE(r.ok()) << r.message;
  const bool flushed = flush_after && runner.stats().flush_after;
  if (flush_after) {
    EXPECT_EQ(flushed, !runner.stats().fused) << "the flush after the attention, unless the step is fused";
    *flush_written = flushed;
  }
  if (flushed)  // the states after this step hold the body pages the flush wrote (its counts stay pending)
    for (int i = 0; i < n; ++i) {
      steps[size_t(i)].next.k.body = flushes[size_t(i)].next.k.body;
      steps[size_t(i)].next.v.body = flushes[size_t(i)].next.v.body;
    }
  if (c.expect_decode >= 0) {
    EXPECT_EQ(runner.stats().decode_path, c.expect_decode == 1) << "attention kernel chosen by the plan";
  }
  if (c.expect_imma >= 0 && !first) {  // the first step flushes the initial window: bodies exist from step 2
    EXPECT_EQ(runner.stats().imma_units > 0, c.expect_imma == 1) << "tensor-core body units in the plan";
  }
  if (c.expect_mma >= 0) {
    EXPECT_EQ(runner.stats().mma_full, c.expect_mma == 1) << "fp16 tiles on the tensor cores";
  }
  if (c.expect_kivi_codes >= 0 && !first) {
    EXPECT_EQ(runner.stats().kivi_codes, c.expect_kivi_codes == 1) << "KIVI body units on the codes";
  }
  if (c.min_row_class > 1) {
    EXPECT_EQ(runner.stats().row_class, c.min_row_class) << "kernel instance's rows";
  }
  if (c.expect_pages >= 0 && !first) {
    EXPECT_EQ(runner.stats().page_units > 0, c.expect_pages == 1) << "InnerQ page units in the plan";
  }
  if (c.ring_stages > 0 && !first) {
    EXPECT_EQ(runner.stats().ring_stages, c.ring_stages) << "ring depth of the tensor-core units";
  }
  if (c.ring_stages == 0 && c.expect_stages > 0 && !first) {
    EXPECT_EQ(runner.stats().ring_stages, c.expect_stages) << "the plan's ring depth";
  }
  r = runner.Synchronize(stream);
  ASSERT_TRUE(r.ok()) << r.message;
  CUDA_OK(cudaStreamDestroy(stream));
  std::vector<uint8_t> gpu_arena(host.size());
  std::vector<uint16_t> o_gpu(qn + kOutGuard);
  CUDA_OK(cudaMemcpy(gpu_arena.data(), d_arena.p, host.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(o_gpu.data(), d_o.p, o_gpu.size() * 2, cudaMemcpyDeviceToHost));

  // CPU reference on the host arena.
  StepParams cp = gp;
  std::vector<uint16_t> o_cpu(qn, 0);
  cp.q = q.data();
  cp.k_new = kn.data();
  cp.v_new = vn.data();
  cp.o = o_cpu.data();
  const Result cpu_r = CpuQuantizeAppend(cp, works.data(), cfgs.data(), n, host.data(), 0);
  ASSERT_TRUE(cpu_r.ok()) << cpu_r.message;
  CpuAttention(cp, works.data(), cfgs.data(), n, host.data(), 0);
  if (flushed) {
    const Result f = CpuQuantizeAppend(cp, flush_works.data(), cfgs.data(), n, host.data(), 0);
    ASSERT_TRUE(f.ok()) << f.message;
  }

  // Pages: byte-identical, guards intact.
  EXPECT_EQ(a.FirstBrokenGuard(gpu_arena.data()), -1) << "GPU wrote into a guard band";
  EXPECT_EQ(a.FirstBrokenGuard(host.data()), -1) << "CPU wrote into a guard band";
  int64_t first_diff = -1, diffs = 0;
  for (size_t i = 0; i < host.size(); ++i)
    if (host[i] != gpu_arena[i]) {
      if (first_diff < 0) first_diff = static_cast<int64_t>(i);
      ++diffs;
    }
  EXPECT_EQ(diffs, 0) << "arena differs from the CPU reference in " << diffs << " bytes, first at "
                      << first_diff;
  // Output: every element written, no NaN, normalized error.
  for (int64_t i = 0; i < kOutGuard; ++i)
    ASSERT_EQ(o_gpu[qn + i], kOutSentinel) << "GPU wrote past the output at " << i;
  double num = 0, den = 0;
  int64_t nans = 0;
  for (int64_t i = 0; i < qn; ++i) {
    const float g = testing::FromAct(o_gpu[i], c.dt);
    const float ref = testing::FromAct(o_cpu[i], c.dt);
    if (std::isnan(g) || std::isnan(ref)) {
      ++nans;
      continue;
    }
    num += double(g - ref) * (g - ref);
    den += double(ref) * ref;
  }
  ASSERT_EQ(nans, 0) << "NaN in the output";
  const double err = std::sqrt(num / std::max(den, 1e-30));
  EXPECT_LT(err, Threshold(c.dt)) << "attention normalized error";
  for (int i = 0; i < n; ++i) (*seqs)[i] = steps[i].next;
}

void RunCase(const Case& c) {
  SCOPED_TRACE(Describe(c));
  std::unique_ptr<CudaStepRunner> runner;
  Result r = CudaStepRunner::Create(&runner);
  ASSERT_TRUE(r.ok()) << r.message;
  runner->set_imma(c.imma);
  runner->set_kivi_mma_min_unit_tokens(c.kivi_min_tokens);
  runner->set_split_blocks(c.split_blocks);
  runner->set_ring_stages(c.ring_stages);
  runner->set_kivi_codes(c.kivi_codes);
  runner->set_min_row_class(c.min_row_class);
  runner->set_ring_offset(c.ring_offset);
  runner->set_page_units(c.page_units);
  if (c.page_min_pages >= 0) runner->set_page_min_pages(c.page_min_pages);
  runner->set_mma_tiles(c.mma_tiles);
  runner->set_bodies_first(c.bodies_first);
  std::mt19937 rng(c.seed);
  Arena a;
  std::vector<TSeq> seqs;
  for (const auto& s : c.seqs)
    seqs.push_back(testing::MakeSeq(a, s.config, c.hkv, c.d, c.dt, s.L0, s.win_first, rng));
  {
    SCOPED_TRACE("step 1 (flush of the initial window)");
    RunAndCompare(c, a, &seqs, true, rng, *runner);
  }
  if (::testing::Test::HasFatalFailure()) return;
  {
    SCOPED_TRACE("step 2");
    RunAndCompare(c, a, &seqs, false, rng, *runner);
  }
}

// The case as given (tensor cores on), then again with them off: the plan must then make no
// tensor-core units.
void RunOnAndOff(Case c) {
  RunCase(c);
  if (::testing::Test::HasFatalFailure()) return;
  c.imma = false;
  if (c.expect_imma >= 0) c.expect_imma = 0;
  if (c.expect_mma >= 0) c.expect_mma = 0;
  if (c.expect_kivi_codes >= 0) c.expect_kivi_codes = 0;
  RunCase(c);
}

const Preset kAllPresets[] = {Preset::kFp16, Preset::kKivi2, Preset::kKivi4,
                              Preset::kInnerQ, Preset::kInnerQ2, Preset::kInnerQBase};

class PresetTest : public ::testing::TestWithParam<std::tuple<Preset, DType>> {};

// Lengths 0/1/G-1/G/G+1/keep+flush/4095, GQA 1/4/8, one sequence per case.
TEST_P(PresetTest, Lengths) {
  SKIP_WITHOUT_GPU();
  const Preset p = std::get<0>(GetParam());
  const DType dt = std::get<1>(GetParam());
  const QuantConfig cfg = PresetConfig(p);
  const int keep_flush = cfg.k.quantized() ? std::max(cfg.k.keep + cfg.k.flush, cfg.v.keep + cfg.v.flush) + cfg.sink : 160;
  const int lengths[] = {0, 1, 31, 32, 33, keep_flush, 4095};
  const int gqa[] = {1, 4, 8};
  int k = 0;
  for (int L : lengths) {
    Case c;
    c.hkv = 2;
    c.hq = 2 * gqa[k % 3];
    c.dt = dt;
    c.seqs = {{p, L, 1, 1, (L * 7) % 128}};
    c.seed = 1000 + k++;
    c.expect_decode = 1;
    RunCase(c);
    if (HasFatalFailure()) return;
  }
}

// Several sequences with different presets, lengths and chunk sizes in one launch (prefill
// chunks are causal within the new tokens); D = 64 and 128.
TEST_P(PresetTest, MixedBatch) {
  SKIP_WITHOUT_GPU();
  const Preset p = std::get<0>(GetParam());
  const DType dt = std::get<1>(GetParam());
  for (int d : {64, 128}) {
    Case c;
    c.hkv = 3;
    c.hq = 12;
    c.d = d;
    c.dt = dt;
    c.seqs = {{p, 0, 40, 3, 0},        // prefill into an empty cache
              {p, 300, 1, 1, 17},
              {Preset::kKivi2, 700, 5, 2, 90},
              {Preset::kInnerQ, 129, 1, 33, 127},
              {p, 1000, 2, 1, 64}};
    c.seed = 77 + d;
    c.expect_decode = 0;  // prefill rows: the generic kernel
    RunCase(c);
    if (HasFatalFailure()) return;
  }
}

// A decode batch (<= 8 query rows per sequence and KV head) mixing presets and lengths in one
// launch: the decode fast path, D = 64 and 128, GQA 4 (n = 1 and 2) and GQA 3.
TEST_P(PresetTest, DecodeBatch) {
  SKIP_WITHOUT_GPU();
  const Preset p = std::get<0>(GetParam());
  const DType dt = std::get<1>(GetParam());
  for (int d : {64, 128}) {
    Case c;
    c.hkv = 2;
    c.hq = 8;
    c.d = d;
    c.dt = dt;
    c.seqs = {{p, 5000, 1, 2, 33},
              {p, 259, 2, 1, 100},
              {Preset::kKivi2, 700, 1, 1, 90},
              {Preset::kInnerQ, 129, 2, 2, 127},
              {p, 17, 1, 1, 64}};
    c.seed = 500 + d;
    c.expect_decode = 1;
    RunCase(c);
    if (HasFatalFailure()) return;
  }
  Case g3;  // Hq = 9, Hkv = 3 (3 rows per KV head)
  g3.hkv = 3;
  g3.hq = 9;
  g3.d = 64;
  g3.dt = dt;
  g3.seqs = {{p, 3000, 1, 1, 5}, {p, 64, 1, 1, 0}};
  g3.seed = 600;
  g3.expect_decode = 1;
  RunCase(g3);
}

INSTANTIATE_TEST_SUITE_P(AllPresets, PresetTest,
                         ::testing::Combine(::testing::ValuesIn(kAllPresets),
                                            ::testing::Values(DType::kF16, DType::kBF16)),
                         [](const auto& info) {
                           return std::string(PresetName(std::get<0>(info.param))) + "_" +
                                  DTypeName(std::get<1>(info.param));
                         });

// One long sequence (32768 tokens) per preset; fp16 and bf16 and GQA 1 / 4 / 8 across them.
TEST(KernelsGpu, Long32k) {
  SKIP_WITHOUT_GPU();
  int k = 0;
  for (Preset p : kAllPresets) {
    Case c;
    c.hkv = 2;
    c.hq = 2 * (k % 3 == 0 ? 4 : k % 3 == 1 ? 1 : 8);
    c.dt = k % 2 == 0 ? DType::kF16 : DType::kBF16;
    c.seqs = {{p, 32768, 1, 1, 3}};
    c.seed = 4242 + k++;
    c.expect_decode = 1;
    RunCase(c);
    if (HasFatalFailure()) return;
  }
}

// Queries 8x larger than elsewhere: scores spread over tens of units, so the softmax is nearly
// one-hot and the exp2 / fixed-point paths see their extreme ratios. Every preset, one row and
// 4 rows per KV head; the first step carries a 9-token prefill chunk (the batch takes the generic
// kernel), the second is a decode step (the decode paths).
TEST(KernelsGpu, SharpScores) {
  SKIP_WITHOUT_GPU();
  int k = 0;
  for (Preset p : kAllPresets) {
    for (int gqa : {1, 4}) {
      Case c;
      c.hkv = 2;
      c.hq = 2 * gqa;
      c.q_scale = 8.f;
      c.seqs = {{p, 3000, 1, 1, 3}, {p, 700, 1, 1, 40}, {p, 200, 9, 1, 0}};
      c.seed = 7700 + k++;
      c.kivi_min_tokens = 0;
      RunCase(c);
      if (HasFatalFailure()) return;
    }
  }
}

// Units of thousands of tokens (the split-KV plan told to fill 2 blocks), as a device with few SMs
// or a large batch makes them: the integer paths' 16-bit fixed-point p must keep its precision
// far below the running maximum of a long unit. Every decode path: fp16 on the tensor cores,
// InnerQ on IMMA units (4 rows) and on the one-row dp4a path, KIVI on the fp16 tensor cores
// (4 rows) and on the one-row dp4a values.
TEST(KernelsGpu, LongUnits) {
  SKIP_WITHOUT_GPU();
  for (Preset p : {Preset::kFp16, Preset::kInnerQ, Preset::kKivi2}) {
    for (int gqa : {1, 4}) {
      Case c;
      c.hkv = 2;
      c.hq = 2 * gqa;
      c.seqs = {{p, 12000, 1, 1, 3}};
      c.seed = 4343 + gqa;
      c.expect_decode = 1;
      c.split_blocks = 2;
      c.kivi_min_tokens = 0;
      RunCase(c);
      if (HasFatalFailure()) return;
    }
  }
}

// Many units per merge item (a short chunk over a long sequence): the fused merge's warps take
// their units eight at a time per lane, so over 32 units per row it runs more than one batch, with
// 1, 2, 4 and 8 rows per item (4 warps to a row, 2, 1, and rows in two passes), D 128 and 64 (two
// units side by side in a warp).
TEST(KernelsGpu, ManyUnitsPerItem) {
  SKIP_WITHOUT_GPU();
  int k = 0;
  for (int rows : {1, 2, 4, 8}) {
    for (int d : {128, 64}) {
      const Preset p = k % 2 == 0 ? Preset::kInnerQ : Preset::kFp16;
      SCOPED_TRACE(std::string(PresetName(p)) + " rows " + std::to_string(rows) + " D " + std::to_string(d));
      Case c;
      c.hkv = 1;
      c.hq = rows;
      c.d = d;
      c.seqs = {{p, 9000, 1, 1, 7}};
      c.seed = 5150 + k++;
      c.expect_decode = 1;
      c.split_blocks = 100;  // ~70 units of 128 tokens
      RunCase(c);
      if (HasFatalFailure()) return;
    }
  }
}

// Every ring depth the tensor-core units take (cp.async.wait_group with 1 to 5 groups in flight):
// the KIVI units 2 to 6 stages, the InnerQ IMMA units and the fp16 units 2 and 3; 4 rows per KV
// head, bodies of one tile to 3000 tokens.
TEST(KernelsGpu, RingDepths) {
  SKIP_WITHOUT_GPU();
  struct Depths {
    Preset p;
    int max_stages;
  };
  int k = 0;
  for (const Depths& dp : {Depths{Preset::kKivi2, 6}, Depths{Preset::kKivi4, 6}, Depths{Preset::kInnerQ, 3},
                           Depths{Preset::kFp16, 3}}) {
    for (int stages = 2; stages <= dp.max_stages; ++stages) {
      SCOPED_TRACE(std::string(PresetName(dp.p)) + " stages " + std::to_string(stages));
      Case c;
      c.hkv = 2;
      c.hq = 8;
      c.d = k % 2 == 0 ? 128 : 64;
      c.seqs = {{dp.p, 3000, 1, 1, 33}, {dp.p, 600, 1, 1, 5}, {dp.p, 170, 1, 1, 0}};
      c.seed = 8100 + k++;
      c.expect_decode = 1;
      c.expect_imma = dp.p == Preset::kFp16 ? -1 : 1;
      c.expect_mma = dp.p == Preset::kFp16 ? 1 : -1;
      c.kivi_min_tokens = 0;
      c.ring_stages = stages;
      RunCase(c);
      if (HasFatalFailure()) return;
    }
  }
}

// Many consecutive decode steps of one batch (every flush phase of innerq and kivi2 comes by:
// innerq's values flush every 32 steps), each checked against the reference. Two launches, the
// attention as a programmatic dependent of the quantize-append; then without PDL and with the
// along_tokens groups flushed one per warp (set_qa_lanes(0); elsewhere forced to one per lane: the
// plan takes lanes only for far larger batches); then with PDL
// and the blocks spread by padded shared memory (set_spread_blocks: at most one block per SM for
// this small batch); then with PDL and the items split into many short units, most of which read
// only the older body and start without waiting (UnitWaitsForQuantizeAppend). Then the fused step
// (one launch, the default), with the plan's units and with the short ones. A misplaced wait would
// let the attention read pages the flush is still writing. The quantize-append's own launches run
// one block per (sequence, KV head) on the steps that allow it (set_qa_head, the default), the
// per-tensor grid in variant 1; variant 2 launches them at the largest shared-memory carveout
// (set_qa_wide_carveout). (The emulated device runs
// the units that skip the wait before the quantize-append's writes, for PDL and the fused step
// alike.)
TEST(KernelsGpu, DecodeStepsInSequence) {
  SKIP_WITHOUT_GPU();
  for (int variant = 0; variant < 6; ++variant) {
    const bool fused = variant >= 4;
    const bool pdl = !fused && variant != 1, spread = variant == 2, split = variant == 3 || variant == 5;
    SCOPED_TRACE(variant == 0   ? "PDL launch"
                 : variant == 1 ? "plain launch, groups per warp"
                 : variant == 2 ? "PDL launch, blocks spread"
                 : variant == 3 ? "PDL launch, short units"
                 : variant == 4 ? "fused step"
                                : "fused step, short units");
    Case c;
    c.hkv = 2;
    c.hq = 8;
    c.seqs = {{Preset::kInnerQ, 700, 1, 1, 3}, {Preset::kKivi2, 900, 1, 1, 0}, {Preset::kFp16, 300, 1, 1, 64},
              {Preset::kInnerQ2, 130, 2, 1, 0}};
    c.seed = 5150;
    std::unique_ptr<CudaStepRunner> runner;
    ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
    runner->set_fused_step(fused);
    runner->set_pdl(pdl);
    runner->set_spread_blocks(spread);
    runner->set_qa_lanes(variant == 1 ? 0 : 1);
    const bool head = variant != 1;
    runner->set_qa_head(head ? 1 : 0);
    runner->set_qa_wide_carveout(spread ? 1 : 0);  // the same kernels at another carveout
    if (split) runner->set_split_blocks(256);
    std::mt19937 rng(c.seed);
    Arena a;
    std::vector<TSeq> seqs = MakeCaseSeqs(c, a, rng);
    int min_early = 1 << 30, max_early = 0, longest_waiting = 0, fused_steps = 0, lane_steps = 0, head_steps = 0;
#if defined(KVQ_EMU_SUITE)
    const uint64_t early_launches = kvq_emu::PdlEarlyLaunches();
#endif
    for (int step = 0; step < 70; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      RunAndCompare(c, a, &seqs, step == 0, rng, *runner);
      if (HasFatalFailure()) return;
      const CudaStepStats& st = runner->stats();
      if (!fused) {
        EXPECT_FALSE(st.fused);
      }
      fused_steps += st.fused ? 1 : 0;
      lane_steps += st.qa_lanes ? 1 : 0;
      EXPECT_EQ(st.qa_wide, spread && !st.fused);
      if (st.qa_head) {
        EXPECT_TRUE(head);
        EXPECT_FALSE(st.qa_lanes);
        ++head_steps;
      }
      EXPECT_LT(st.early_units, st.num_units) << "the units over the new tokens wait";
      min_early = std::min(min_early, st.early_units);
      max_early = std::max(max_early, st.early_units);
      longest_waiting = std::max(longest_waiting, st.longest_waiting_unit);
    }
    // innerq's values flush 32 tokens at steps 0, 32 and 64, kivi2's keys 128 at step 0 (the
    // first step also flushes the initial windows): the other steps are one launch each
    if (fused) {
      EXPECT_GE(fused_steps, 60);
    }
    // those steps' own launches flush along_tokens groups of 32, one per lane unless turned off
    if (variant == 1) {
      EXPECT_EQ(lane_steps, 0);
    } else {
      EXPECT_GE(lane_steps, 3);  // innerq's values at steps 0, 32 and 64 at least
    }
    // the other steps' own launches: one block per head where asked for (steps 1-69 but 32 and 64)
    if (!head) {
      EXPECT_EQ(head_steps, 0);
    } else if (!fused) {
      EXPECT_GE(head_steps, 60);
    }
    if (split) {
      EXPECT_GT(min_early, 0) << "short units over the older body start without waiting";
      // units of 128 tokens at this split: the ones over the step's writes are as short
      EXPECT_LE(longest_waiting, 128) << "only short units wait";
    }
#if defined(KVQ_EMU_SUITE)
    // the emulated device ran the PDL launches adversarially (the units that skip the wait before
    // the quantize-append's writes), the plain ones not (in the fused variants, the steps that
    // flush along_tokens groups launch the quantize-append on its own, then the attention plainly)
    EXPECT_EQ(kvq_emu::PdlEarlyLaunches() - early_launches, pdl ? 70u : 0u);
#endif
    std::printf("[ variant %d ] units that start without waiting for the quantize-append: %d to %d per step; the "
                "longest that waits: %d tokens; fused steps: %d of 70; lane flushes: %d; one block per head: %d\n", variant,
                min_early, max_early, longest_waiting, fused_steps, lane_steps, head_steps);
  }
}

// Consecutive decode steps with each step's flush written beside the attention of the step before
// (RunStep's flush_after, SeqWork::flush_done): the step appends only, its units over the
// pre-flushed tokens start without waiting, and the flush-only launch after its attention writes
// the next step's codes, byte-identical to the reference's flush, while (on the GPU) the attention
// still runs. Every flush phase comes by (innerq's values every 32 steps, kivi2's keys at 128 with
// the initial window), with the attention as a programmatic dependent of the append, in short
// units, and as the fused step: there no flush follows a fused step (its successor flushes as
// usual, unfused when that flush is along_tokens groups, and is followed by one). (The emulated
// device runs the flush-only launch's blocks on memory as the attention's last unit let it
// launch, and fails a byte both write.)
TEST(KernelsGpu, FlushAfterAttention) {
  SKIP_WITHOUT_GPU();
  for (int variant = 0; variant < 3; ++variant) {
    const bool fused = variant == 1, split = variant == 2;
    SCOPED_TRACE(variant == 0 ? "PDL launch" : variant == 1 ? "fused step" : "PDL launch, short units");
    Case c;
    c.hkv = 2;
    c.hq = 8;
    c.seqs = {{Preset::kInnerQ, 700, 1, 1, 3}, {Preset::kKivi2, 900, 1, 1, 0}, {Preset::kFp16, 300, 1, 1, 64},
              {Preset::kInnerQ2, 130, 2, 1, 0}};
    c.seed = 6160 + variant;
    std::unique_ptr<CudaStepRunner> runner;
    ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
    runner->set_fused_step(fused);
    runner->set_pdl(!fused);
    if (split) runner->set_split_blocks(256);
    std::mt19937 rng(c.seed);
    Arena a;
    std::vector<TSeq> seqs = MakeCaseSeqs(c, a, rng);
    int min_early = 1 << 30, fused_steps = 0, flush_steps = 0, done_steps = 0;
#if defined(KVQ_EMU_SUITE)
    const uint64_t early_launches = kvq_emu::PdlEarlyLaunches();
#endif
    constexpr int kSteps = 40;
    bool written = false;
    for (int step = 0; step < kSteps; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      done_steps += written ? 1 : 0;
      RunAndCompare(c, a, &seqs, step == 0, rng, *runner, &written);
      if (HasFatalFailure()) return;
      const CudaStepStats& st = runner->stats();
      fused_steps += st.fused ? 1 : 0;
      flush_steps += st.flush_after ? 1 : 0;
      EXPECT_LT(st.early_units, st.num_units) << "the units over the new tokens wait";
      if (step > 0) min_early = std::min(min_early, st.early_units);
    }
    // the batch flushes something at every step (innerq's keys): a flush after every unfused step
    EXPECT_EQ(fused_steps + flush_steps, kSteps);
    if (!fused) {
      EXPECT_EQ(flush_steps, kSteps);
      EXPECT_EQ(done_steps, kSteps - 1) << "every step after the first found its flush done";
    } else {
      EXPECT_GE(fused_steps, kSteps / 2) << "a one-token flush fuses";
      EXPECT_GE(flush_steps, 1) << "the steps that flush along_tokens groups are not fused";
    }
    if (split) {
      EXPECT_GT(min_early, 0) << "short units over the older and the pre-flushed body start without waiting";
    }
#if defined(KVQ_EMU_SUITE)
    // each flush-only launch ran early (before the attention's later writes), and with PDL the
    // attention's units that skip the wait before the append's writes
    const uint64_t early = kvq_emu::PdlEarlyLaunches() - early_launches;
    EXPECT_EQ(early, static_cast<uint64_t>((fused ? 0 : kSteps) + flush_steps));
#endif
    std::printf("[ variant %d ] units that start without waiting: at least %d per step after the first; fused steps: "
                "%d, flushes after the attention: %d of %d\n", variant, min_early == (1 << 30) ? 0 : min_early,
                fused_steps, flush_steps, kSteps);
  }
}

// A small batch of long KIVI sequences on the per-token path, one query row per KV head, as a
// programmatic dependent and as the fused step: each item's tail from the first token the
// quantize-append writes is a unit of its own, so the units that wait for it are short and the
// rest (long chunks of the older body) start beside it; every step checked against the reference
// (kivi2's values flush every step, kivi4's keys at 128).
TEST(KernelsGpu, TailUnitsWait) {
  SKIP_WITHOUT_GPU();
  for (const bool fused : {false, true}) {
  SCOPED_TRACE(fused ? "fused step" : "PDL launch");
  Case c;
  c.hkv = 2;
  c.hq = 2;
  c.seqs = {{Preset::kKivi4, 6000, 1, 1, 3}, {Preset::kKivi2, 5000, 1, 1, 0}};
  c.seed = 7310;
  std::unique_ptr<CudaStepRunner> runner;
  ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
  runner->set_fused_step(fused);
  runner->set_pdl(true);
  runner->set_imma(false);       // the per-token path for every tile, as below the code units' minimum
  runner->set_split_blocks(32);  // 4 items x 8 <= 32: the few-items plan; chunks of ~700 tokens
  std::mt19937 rng(c.seed);
  Arena a;
  std::vector<TSeq> seqs = MakeCaseSeqs(c, a, rng);
  for (int step = 0; step < 36; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    RunAndCompare(c, a, &seqs, step == 0, rng, *runner);
    if (HasFatalFailure()) return;
    const CudaStepStats& st = runner->stats();
    if (step == 0) continue;  // the first step flushes the initial windows: every unit waits
    ASSERT_GE(st.chunk_tokens, 512);
    EXPECT_GT(st.early_units, 0);
    // the window before a flush (128) + a new token + one tile of margin + a 4-tile step
    EXPECT_LE(st.longest_waiting_unit, 128 + 1 + 32 + 128) << "chunk " << st.chunk_tokens;
  }
  }
}

// The current device's SM count (the plan's policies are stated in resident blocks).
void DeviceSms(int* sms) {
  int dev = 0;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev));
}

// The plan's PDL choice (set_pdl_auto, the default) for steps launched as two kernels
// (set_fused_step(false)), each checked against the reference: one sequence of one KV head (a
// quantize-append grid of 2 blocks, never more than the SMs) launches as a programmatic dependent;
// a batch whose quantize-append grid covers more than one block per SM, followed by under 1.5
// waves of attention units, launches plainly; set_pdl overrides the plan either way.
TEST(KernelsGpu, PdlPolicy) {
  SKIP_WITHOUT_GPU();
  int sms = 0;
  ASSERT_NO_FATAL_FAILURE(DeviceSms(&sms));
  struct Want {
    int num_seqs;
    int forced;  // -1 the plan, 0 off, 1 on
    bool pdl;
  };
  const int many = sms + 1;  // x 1 KV head x 2 tensors > the SMs
  for (const Want& w : {Want{1, -1, true}, Want{many, -1, false}, Want{many, 1, true}, Want{1, 0, false}}) {
    SCOPED_TRACE("seqs " + std::to_string(w.num_seqs) + " forced " + std::to_string(w.forced));
    Case c;
    c.hkv = 1;
    c.hq = 4;
    c.d = 64;
    for (int i = 0; i < w.num_seqs; ++i) c.seqs.push_back({i % 2 ? Preset::kKivi2 : Preset::kInnerQ, 40 + i % 7, 1, 1, 0});
    c.seed = 6200 + w.num_seqs + w.forced;
    std::unique_ptr<CudaStepRunner> runner;
    ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
    if (w.forced >= 0) runner->set_pdl(w.forced == 1);
    runner->set_fused_step(false);
    std::mt19937 rng(c.seed);
    Arena a;
    std::vector<TSeq> seqs = MakeCaseSeqs(c, a, rng);
    RunAndCompare(c, a, &seqs, true, rng, *runner);
    if (HasFatalFailure()) return;
    EXPECT_EQ(runner->stats().pdl, w.pdl);
    EXPECT_FALSE(runner->stats().fused);
  }
}

// The plan's fused-step choice (the default, no set_fused_step), each step checked against the
// reference: a long KIVI sequence and a long fp16 one in a one-row plan are fused after the first
// step (which flushes the initial windows, so its quantize-append runs on its own); a short KIVI
// sequence and a long InnerQ one are not; set_fused_step(true) fuses the InnerQ one.
TEST(KernelsGpu, FusedStepPolicy) {
  SKIP_WITHOUT_GPU();
  struct Want {
    Preset preset;
    int length;
    int forced;  // -1 the plan, 1 on
    bool fused;
  };
  for (const Want& w : {Want{Preset::kKivi2, 17000, -1, true}, Want{Preset::kFp16, 17000, -1, true},
                        Want{Preset::kKivi2, 3000, -1, false}, Want{Preset::kInnerQ, 17000, -1, false},
                        Want{Preset::kInnerQ, 17000, 1, true}}) {
    SCOPED_TRACE(std::string(PresetName(w.preset)) + " " + std::to_string(w.length) + " forced " +
                 std::to_string(w.forced));
    Case c;
    c.hkv = 1;
    c.hq = 1;
    c.d = 64;
    c.seqs = {{w.preset, w.length, 1, 1, 0}};
    c.seed = 7700 + w.length + w.forced;
    std::unique_ptr<CudaStepRunner> runner;
    ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
    if (w.forced == 1) runner->set_fused_step(true);
    std::mt19937 rng(c.seed);
    Arena a;
    std::vector<TSeq> seqs = MakeCaseSeqs(c, a, rng);
    for (int step = 0; step < 3; ++step) {
      RunAndCompare(c, a, &seqs, step == 0, rng, *runner);
      if (HasFatalFailure()) return;
      if (step > 0) {
        EXPECT_EQ(runner->stats().fused, w.fused) << "step " << step;
      }
    }
  }
}

// Explicit configs beyond the presets: group sizes 64 and 128, 3- and 4-bit, an odd sink, keep and
// flush values that leave partial pages, hybrid keys along tokens, mixed in one batch.
TEST(KernelsGpu, CustomConfigs) {
  SKIP_WITHOUT_GPU();
  QuantConfig a;
  a.k = Fmt(QuantMode::kSym, 3, Grouping::kAlongTokens, 64, 10, 64);
  a.v = Fmt(QuantMode::kAsym, 4, Grouping::kAlongChannels, 128, 7, 3);
  a.sink = 5;
  a.key_norm = true;
  QuantConfig b;
  b.k = Fmt(QuantMode::kHybrid, 2, Grouping::kAlongTokens, 128, 0, 128);
  b.v = Fmt(QuantMode::kHybrid, 3, Grouping::kAlongTokens, 32, 40, 96);
  b.sink = 0;
  QuantConfig c;
  c.k = Fmt(QuantMode::kAsym, 4, Grouping::kAlongChannels, 64, 1, 2);
  c.v = TensorFormat{};  // full-precision values
  c.sink = 128;
  ASSERT_EQ(ValidateConfig(a, 128), "");
  ASSERT_EQ(ValidateConfig(b, 128), "");
  ASSERT_EQ(ValidateConfig(c, 128), "");
  for (DType dt : {DType::kF16, DType::kBF16}) {
    Case cs;
    cs.hkv = 2;
    cs.hq = 8;
    cs.dt = dt;
    cs.seqs = {SeqSpec(a, 1000, 2, 1, 77), SeqSpec(b, 2999, 1, 3, 5), SeqSpec(c, 700, 1, 1, 0),
               SeqSpec(a, 3, 4, 1, 0)};  // the last one's sink is not full yet
    cs.seed = 9000 + static_cast<int>(dt);
    cs.expect_decode = 0;  // group sizes 64/128 and an odd sink: the generic kernel
    RunCase(cs);
    if (HasFatalFailure()) return;
  }
}

// Explicit G = 32 configs that the decode fast path takes beyond the presets: 3-bit along_tokens
// keys with key normalization, 3-bit along_channels values (codes crossing words), hybrid 4-bit
// both ways, full-precision keys with quantized values and the reverse, sinks of 32/64/96 tokens.
// Values that make the sequential quantizer's choices hard to reproduce in parallel
// (testing::EdgeActivation: signed zeros, constants, repeated extremes, two-level groups) in
// every third window token, flushed by the first step through the kernel; pages must stay
// byte-identical to the CPU reference.
TEST(KernelsGpu, QuantizeEdgeValues) {
  SKIP_WITHOUT_GPU();
  QuantConfig a;  // hybrid both ways, G = 32
  a.k = Fmt(QuantMode::kHybrid, 2, Grouping::kAlongChannels, 32, 3, 1);
  a.v = Fmt(QuantMode::kHybrid, 3, Grouping::kAlongTokens, 32, 5, 32);
  QuantConfig b;  // asym / sym at G = 64 and 128, key normalization on
  b.k = Fmt(QuantMode::kAsym, 4, Grouping::kAlongTokens, 64, 0, 64);
  b.v = Fmt(QuantMode::kSym, 3, Grouping::kAlongChannels, 128, 2, 1);
  b.key_norm = true;
  QuantConfig c;  // hybrid at G = 128 along tokens, asym at G = 64 along channels
  c.k = Fmt(QuantMode::kHybrid, 4, Grouping::kAlongTokens, 128, 0, 128);
  c.v = Fmt(QuantMode::kAsym, 4, Grouping::kAlongChannels, 64, 1, 1);
  const std::vector<std::pair<std::string, QuantConfig>> configs = {
      {"innerq", PresetConfig(Preset::kInnerQ)}, {"kivi2", PresetConfig(Preset::kKivi2)},
      {"innerq2", PresetConfig(Preset::kInnerQ2)}, {"a", a}, {"b", b}, {"c", c}};
  for (const auto& [name, cfg] : configs) {
    ASSERT_EQ(ValidateConfig(cfg, 128), "") << name;
    for (DType dt : {DType::kF16, DType::kBF16}) {
      SCOPED_TRACE(name + " " + DTypeName(dt));
      Case cs;
      cs.hkv = 2;
      cs.hq = 8;
      cs.dt = dt;
      cs.seqs = {SeqSpec(cfg, 700, 1, 1, 3)};
      cs.seed = 7100 + static_cast<int>(dt);
      std::unique_ptr<CudaStepRunner> runner;
      Result r = CudaStepRunner::Create(&runner);
      ASSERT_TRUE(r.ok()) << r.message;
      std::mt19937 rng(cs.seed);
      Arena arena;
      std::vector<TSeq> seqs = {testing::MakeSeq(arena, cfg, cs.hkv, cs.d, dt, 700, 3, rng)};
      testing::FillEdgeWindow(arena, seqs[0], cs.hkv, cs.d, dt, rng);
      RunAndCompare(cs, arena, &seqs, true, rng, *runner);
      if (HasFatalFailure()) return;
      RunAndCompare(cs, arena, &seqs, false, rng, *runner);
      if (HasFatalFailure()) return;
    }
  }
}

// A flushed value that is not finite, or one whose group's scale leaves fp16 range (bf16 keeps
// such values), fails the step with kInvalidArgument at Synchronize; the runner is usable again.
TEST(KernelsGpu, QuantizeReportsBadValues) {
  SKIP_WITHOUT_GPU();
  struct Bad {
    DType dt;
    float v;
  };
  const Bad bads[] = {{DType::kF16, std::numeric_limits<float>::infinity()},
                      {DType::kF16, std::numeric_limits<float>::quiet_NaN()},
                      {DType::kBF16, 1e9f}};
  for (const Bad& b : bads) {
    SCOPED_TRACE(std::string(DTypeName(b.dt)) + " " + std::to_string(b.v));
    std::unique_ptr<CudaStepRunner> runner;
    ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
    std::mt19937 rng(31);
    Arena a;
    const QuantConfig cfg = PresetConfig(Preset::kInnerQ);
    const int hq = 4, hkv = 2, d = 128;
    TSeq s = testing::MakeSeq(a, cfg, hkv, d, b.dt, 400, 0, rng);
    // window token 40 (flushed into the K and the V body by this step), head 1, channel 17
    for (const testing::TStream* st : {&s.k, &s.v}) {
      uint16_t* p = reinterpret_cast<uint16_t*>(a.bytes().data() + st->win[0] + FullTokenOffset(40, 1, d));
      p[17] = testing::ToAct(b.v, b.dt);
    }
    TStep st = testing::PlanStep(a, s, hkv, d, 1, 0, 0);
    st.Point();
    ASSERT_GT(st.w.flush_k, 40);
    ASSERT_GT(st.w.flush_v, 40);
    std::vector<uint8_t>& host = a.bytes();
    DevBuf<uint8_t> d_arena(host.size());
    DevBuf<uint16_t> d_q(hq * d), d_k(hkv * d), d_v(hkv * d), d_o(hq * d);
    ASSERT_TRUE(d_arena.p && d_q.p && d_k.p && d_v.p && d_o.p);
    CUDA_OK(cudaMemcpy(d_arena.p, host.data(), host.size(), cudaMemcpyHostToDevice));
    const std::vector<uint16_t> q = testing::RandomActs(hq * d, b.dt, rng, 1.f);
    const std::vector<uint16_t> kv = testing::RandomActs(hkv * d, b.dt, rng, 1.f);
    CUDA_OK(cudaMemcpy(d_q.p, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_k.p, kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_v.p, kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
    const StepParams p = Params(hq, hkv, d, b.dt, d_q.p, d_k.p, d_v.p, d_o.p);
    Result r = runner->RunStep(p, &st.w, &st.next.cfg, 1, d_arena.p, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    r = runner->Synchronize(nullptr);
    EXPECT_EQ(r.code, Code::kInvalidArgument) << r.message;
    EXPECT_NE(r.message.find("not finite"), std::string::npos) << r.message;
    r = runner->Synchronize(nullptr);
    EXPECT_TRUE(r.ok()) << "the error flag is cleared: " << r.message;
    // The same step with its inputs and output in host memory (RunStepFromHost, the store's path),
    // the flag set in mapped host memory and in device memory: the same error, o left as it was,
    // the flag cleared after it (the next step from host memory succeeds once the value is fixed).
    for (const bool mapped : {true, false}) {
      SCOPED_TRACE(mapped ? "mapped output" : "copied output");
      runner->set_mapped_output(mapped);
      std::vector<uint16_t> o_host(size_t(hq) * d, 0x1234);
      const StepParams ph = Params(hq, hkv, d, b.dt, q.data(), kv.data(), kv.data(), o_host.data());
      r = runner->RunStepFromHost(ph, int64_t{hq} * d * 2, int64_t{hkv} * d * 2, &st.w, &st.next.cfg, 1, d_arena.p,
                                  nullptr);
      EXPECT_EQ(r.code, Code::kInvalidArgument) << r.message;
      EXPECT_NE(r.message.find("not finite"), std::string::npos) << r.message;
      EXPECT_EQ(runner->stats().mapped_output, mapped);
      EXPECT_EQ(o_host[0], 0x1234) << "o is written only by a step that succeeded";
      r = runner->Synchronize(nullptr);
      EXPECT_TRUE(r.ok()) << "the error flag is cleared: " << r.message;
    }
    runner->set_mapped_output(true);
  }
}

// RunStepFromHost (inputs in the descriptor upload, o back with the error flag) against RunStep on
// device buffers: the same o and the same arena bytes, bit for bit, for a decode step and for
// prefill chunks whose o outgrows the runner's first output region (64 KB) and, at 130 tokens, the
// mapped output's bound (copied back then); o written into mapped host memory and copied back;
// rows it does not own are refused before anything runs.
TEST(KernelsGpu, RunStepFromHostMatchesRunStep) {
  SKIP_WITHOUT_GPU();
  std::unique_ptr<CudaStepRunner> dev_runner, host_runner;
  ASSERT_TRUE(CudaStepRunner::Create(&dev_runner).ok());
  ASSERT_TRUE(CudaStepRunner::Create(&host_runner).ok());
  std::mt19937 rng(47);
  const int hq = 8, hkv = 2, d = 128;
  for (const Preset preset : {Preset::kKivi2, Preset::kInnerQ, Preset::kFp16}) {
    for (const int n : {1, 80, 130}) {
      SCOPED_TRACE(std::string(PresetName(preset)) + " n_new " + std::to_string(n));
      Arena a;
      const QuantConfig cfg = PresetConfig(preset);
      TSeq s = testing::MakeSeq(a, cfg, hkv, d, DType::kF16, 700, 0, rng);
      TStep st = testing::PlanStep(a, s, hkv, d, n, /*kv_row=*/3, /*q_row=*/2);
      st.Point();
      const std::vector<uint8_t>& host = a.bytes();
      DevBuf<uint8_t> arena_a(host.size()), arena_b(host.size());
      const int64_t q_bytes = int64_t{2 + n} * hq * d * 2, kv_bytes = int64_t{3 + n} * hkv * d * 2;
      DevBuf<uint16_t> d_q(q_bytes / 2), d_k(kv_bytes / 2), d_v(kv_bytes / 2), d_o(q_bytes / 2);
      ASSERT_TRUE(arena_a.p && arena_b.p && d_q.p && d_k.p && d_v.p && d_o.p);
      CUDA_OK(cudaMemcpy(arena_a.p, host.data(), host.size(), cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemcpy(arena_b.p, host.data(), host.size(), cudaMemcpyHostToDevice));
      const std::vector<uint16_t> q = testing::RandomActs(q_bytes / 2, DType::kF16, rng, 1.f);
      const std::vector<uint16_t> k = testing::RandomActs(kv_bytes / 2, DType::kF16, rng, 1.f);
      const std::vector<uint16_t> v = testing::RandomActs(kv_bytes / 2, DType::kF16, rng, 1.f);
      CUDA_OK(cudaMemcpy(d_q.p, q.data(), q_bytes, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemcpy(d_k.p, k.data(), kv_bytes, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemcpy(d_v.p, v.data(), kv_bytes, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemset(d_o.p, 0, q_bytes));
      const StepParams p = Params(hq, hkv, d, DType::kF16, d_q.p, d_k.p, d_v.p, d_o.p);
      Result r = dev_runner->RunStep(p, &st.w, &st.next.cfg, 1, arena_a.p, nullptr);
      ASSERT_TRUE(r.ok()) << r.message;
      ASSERT_TRUE(dev_runner->Synchronize(nullptr).ok());
      std::vector<uint16_t> o_dev(q_bytes / 2), o_host(q_bytes / 2, 0);
      CUDA_OK(cudaMemcpy(o_dev.data(), d_o.p, q_bytes, cudaMemcpyDeviceToHost));
      const StepParams ph = Params(hq, hkv, d, DType::kF16, q.data(), k.data(), v.data(), o_host.data());
      // rows past the given bytes: refused, nothing written
      r = host_runner->RunStepFromHost(ph, q_bytes - 2, kv_bytes, &st.w, &st.next.cfg, 1, arena_b.p, nullptr);
      EXPECT_EQ(r.code, Code::kInvalidArgument) << r.message;
      r = host_runner->RunStepFromHost(ph, q_bytes, kv_bytes - 2, &st.w, &st.next.cfg, 1, arena_b.p, nullptr);
      EXPECT_EQ(r.code, Code::kInvalidArgument) << r.message;
      std::vector<uint8_t> bytes_a(host.size()), bytes_b(host.size());
      CUDA_OK(cudaMemcpy(bytes_a.data(), arena_a.p, host.size(), cudaMemcpyDeviceToHost));
      for (const bool mapped : {true, false}) {
        SCOPED_TRACE(mapped ? "mapped output" : "copied output");
        host_runner->set_mapped_output(mapped);
        CUDA_OK(cudaMemcpy(arena_b.p, host.data(), host.size(), cudaMemcpyHostToDevice));
        std::fill(o_host.begin(), o_host.end(), 0);
        r = host_runner->RunStepFromHost(ph, q_bytes, kv_bytes, &st.w, &st.next.cfg, 1, arena_b.p, nullptr);
        ASSERT_TRUE(r.ok()) << r.message;
        EXPECT_EQ(host_runner->stats().mapped_output, mapped && q_bytes <= CudaStepRunner::kMappedOutputMaxBytes);
        // the rows the step owns (query rows 2 .. 2 + n); RunStepFromHost leaves the others unspecified
        const std::vector<uint16_t> own_dev(o_dev.begin() + 2 * hq * d, o_dev.end());
        const std::vector<uint16_t> own_host(o_host.begin() + 2 * hq * d, o_host.end());
        EXPECT_EQ(own_host, own_dev);
        EXPECT_GT(std::count_if(own_host.begin(), own_host.end(), [](uint16_t x) { return x != 0; }),
                  int64_t(own_host.size()) / 2)
            << "o was written";
        CUDA_OK(cudaMemcpy(bytes_b.data(), arena_b.p, host.size(), cudaMemcpyDeviceToHost));
        EXPECT_TRUE(bytes_a == bytes_b) << "the arenas differ after the same step";
      }
    }
  }
}

TEST(KernelsGpu, DecodeCustomConfigs) {
  SKIP_WITHOUT_GPU();
  const auto fmt = QuantFormat32;
  QuantConfig a;
  a.k = fmt(QuantMode::kSym, 3, Grouping::kAlongTokens, 10, 64);
  a.v = fmt(QuantMode::kAsym, 3, Grouping::kAlongChannels, 7, 3);
  a.sink = 64;
  a.key_norm = true;
  QuantConfig b;
  b.k = fmt(QuantMode::kHybrid, 4, Grouping::kAlongChannels, 1, 2);
  b.v = fmt(QuantMode::kHybrid, 4, Grouping::kAlongTokens, 40, 96);
  b.sink = 32;
  QuantConfig c;
  c.k = TensorFormat{};
  c.v = fmt(QuantMode::kSym, 2, Grouping::kAlongTokens, 5, 32);
  QuantConfig e;
  e.k = fmt(QuantMode::kAsym, 2, Grouping::kAlongChannels, 3, 1);
  e.v = TensorFormat{};
  e.sink = 96;
  e.key_norm = true;
  QuantConfig f;
  f.k = fmt(QuantMode::kHybrid, 3, Grouping::kAlongTokens, 0, 32);
  f.v = fmt(QuantMode::kSym, 3, Grouping::kAlongTokens, 33, 32);
  for (const QuantConfig* q : {&a, &b, &c, &e, &f}) ASSERT_EQ(ValidateConfig(*q, 128), "");
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      Case cs;
      cs.hkv = 2;
      cs.hq = 8;
      cs.d = d;
      cs.dt = dt;
      cs.seqs = {SeqSpec(a, 1000, 2, 1, 77), SeqSpec(b, 2999, 1, 2, 5), SeqSpec(c, 700, 1, 1, 0),
                 SeqSpec(e, 300, 2, 2, 9),   SeqSpec(f, 1500, 1, 1, 31),
                 SeqSpec(a, 3, 1, 1, 0)};  // the last one's sink is not full yet
      cs.seed = 9100 + k++;
      cs.expect_decode = 1;
      RunCase(cs);
      if (HasFatalFailure()) return;
    }
  }
}

// InnerQ-layout configs of the IMMA bits beyond the presets (K along_channels, V along_tokens,
// G = 32): (2, 2) asym / sym without sink or key norm, (3, 3) hybrid / asym with a 64-token sink,
// (3, 2) sym / hybrid with a 96-token sink, both with key norm.
struct ImmaConfigs {
  QuantConfig a, b, e, f;
};
ImmaConfigs MakeImmaConfigs() {
  const auto fmt = QuantFormat32;
  ImmaConfigs c;
  c.a.k = fmt(QuantMode::kAsym, 2, Grouping::kAlongChannels, 5, 1);
  c.a.v = fmt(QuantMode::kSym, 2, Grouping::kAlongTokens, 3, 32);
  c.b.k = fmt(QuantMode::kHybrid, 3, Grouping::kAlongChannels, 40, 1);
  c.b.v = fmt(QuantMode::kAsym, 3, Grouping::kAlongTokens, 10, 64);
  c.b.sink = 64;
  c.b.key_norm = true;
  c.e.k = fmt(QuantMode::kSym, 3, Grouping::kAlongChannels, 0, 1);
  c.e.v = fmt(QuantMode::kHybrid, 2, Grouping::kAlongTokens, 0, 32);
  c.e.sink = 96;
  c.e.key_norm = true;
  // innerq's bits and key mode with other value modes: the page units' (3, 2) instance that reads
  // the modes per tile (there the presets' combinations have instances of their own)
  c.f.k = fmt(QuantMode::kSym, 3, Grouping::kAlongChannels, 20, 1);
  c.f.v = fmt(QuantMode::kAsym, 2, Grouping::kAlongTokens, 30, 32);
  c.f.sink = 32;
  return c;
}

// InnerQ-layout batches (keys along channels, values along tokens, G = 32, 2 to 4 rows per KV
// head): their body tiles run on the tensor cores (decode_imma.cuh), sink and window tokens on the
// per-token path, both in one launch; with one row the per-token path's dp4a products take all. The presets and explicit configs of every mode the IMMA
// instances cover ((K, V) bits (2, 2), (3, 2), (3, 3); sym / asym / hybrid; sinks 0 / 32 / 64 /
// 96; key normalization on and off; the presets' mode combinations and other modes at the same
// bits, all on the warp rings' run-time-mode instance), GQA 1, 2 and 4 rows, body lengths from one tile to 5000
// tokens, D 64 and 128, fp16 and bf16; then the same batch with the tensor cores off.
TEST(KernelsGpu, ImmaBody) {
  SKIP_WITHOUT_GPU();
  const ImmaConfigs ic = MakeImmaConfigs();
  const QuantConfig &a = ic.a, &b = ic.b, &e = ic.e, &f = ic.f;
  for (const QuantConfig* q : {&a, &b, &e, &f}) ASSERT_EQ(ValidateConfig(*q, 128), "");
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int gqa : {1, 2}) {
        Case cs;
        cs.hkv = 2;
        cs.hq = 2 * gqa;
        cs.d = d;
        cs.dt = dt;
        cs.seqs = {SeqSpec(Preset::kInnerQ, 5000, 1, 2, 33), SeqSpec(Preset::kInnerQ2, 700, 2, 1, 100),
                   SeqSpec(Preset::kInnerQBase, 1300, 1, 1, 5), SeqSpec(a, 1000, 2, 2, 77),
                   SeqSpec(b, 2999, 1, 1, 5), SeqSpec(e, 230, 1, 2, 9), SeqSpec(f, 600, 2, 1, 40),
                   SeqSpec(a, 40, 1, 1, 0),  // one body tile
                   SeqSpec(Preset::kInnerQ, 17, 1, 1, 64)};  // no body: per-token units only
        cs.seed = 9300 + k++;
        cs.expect_decode = 1;
        cs.expect_imma = 1;
        cs.page_units = false;  // the IMMA units' own rings (RowsPages runs the same tiles from pages)
        RunOnAndOff(cs);
        if (HasFatalFailure()) return;
        if (gqa == 2 && dt == DType::kF16) {
          // a large split: few items per unit of capacity, so sinks and windows get per-token units
          // of their own (and items many units: the merge reads more than 32 partials per row)
          Case big = cs;
          big.split_blocks = 1024;
          RunCase(big);
          if (HasFatalFailure()) return;
        }
        if (gqa == 1) {  // one row per KV head: the per-token path's integer products (no IMMA units)
          for (auto& q : cs.seqs) q.n1 = q.n2 = 1;
          cs.expect_imma = 0;
          RunCase(cs);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

// The KIVI batches of the tensor-core unit tests: both presets and two explicit configs a, b with
// bodies from one tile to 5000 tokens, n new tokens in some, a 3-bit config (no tensor-core units:
// the per-token path in the same launch) and two short sequences (one body tile; none).
std::vector<SeqSpec> KiviMixedBatch(const QuantConfig& a, const QuantConfig& b, int n) {
  QuantConfig c3;
  c3.k = QuantFormat32(QuantMode::kAsym, 3, Grouping::kAlongTokens, 0, 32);
  c3.v = QuantFormat32(QuantMode::kAsym, 3, Grouping::kAlongChannels, 20, 1);
  return {SeqSpec(Preset::kKivi2, 5000, n, n, 33), SeqSpec(Preset::kKivi4, 1200, n, 1, 100),
          SeqSpec(a, 2999, 1, n, 5),             SeqSpec(b, 700, n, n, 77),
          SeqSpec(c3, 1000, 1, 1, 9),            SeqSpec(Preset::kKivi2, 200, 1, 1, 0),
          SeqSpec(Preset::kKivi2, 40, 1, 1, 64)};
}

// KIVI-layout body tiles dequantized into activations on the fp16 / bf16 tensor cores
// (decode_mma_kivi.cuh) next to the per-token units of the same items, in one launch: the KIVI
// presets and explicit configs of every mode ((K, V) bits (2, 2) and (4, 4); sym / asym / hybrid;
// sinks 0 / 32; key normalization on), a 3-bit config that stays on the per-token path in the same
// batch, 2 to 8 rows per KV head (GQA 2/4/8, 2 new tokens at GQA 4), body lengths from one tile to
// 5000 tokens, D 64 and 128, fp16 (bf16 batches must stay on the per-token path: the same cases
// check that and its results); then the same batch with the tensor cores off. The batch-size
// threshold of the plan is off here (these batches are small).
TEST(KernelsGpu, KiviMmaBody) {
  SKIP_WITHOUT_GPU();
  const auto fmt = QuantFormat32;
  QuantConfig a;  // 2-bit sym keys, 2-bit hybrid values, sink 32, key norm
  a.k = fmt(QuantMode::kSym, 2, Grouping::kAlongTokens, 0, 64);
  a.v = fmt(QuantMode::kHybrid, 2, Grouping::kAlongChannels, 40, 1);
  a.sink = 32;
  a.key_norm = true;
  QuantConfig b;  // 4-bit hybrid keys, 4-bit sym values
  b.k = fmt(QuantMode::kHybrid, 4, Grouping::kAlongTokens, 16, 32);
  b.v = fmt(QuantMode::kSym, 4, Grouping::kAlongChannels, 7, 3);
  for (const QuantConfig* q : {&a, &b}) ASSERT_EQ(ValidateConfig(*q, 64), "");
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int gqa : {2, 4, 8}) {
        const int n = gqa == 4 ? 2 : 1;
        Case cs;
        cs.hkv = 2;
        cs.hq = 2 * gqa;
        cs.d = d;
        cs.dt = dt;
        cs.seqs = KiviMixedBatch(a, b, n);
        cs.seed = 9900 + k++;
        cs.expect_decode = 1;
        cs.expect_imma = dt == DType::kF16 ? 1 : 0;
        cs.kivi_min_tokens = 0;
        RunOnAndOff(cs);
        if (HasFatalFailure()) return;
        if (gqa == 4 && dt == DType::kBF16) {  // own units for sinks and windows (as in ImmaBody)
          Case big = cs;
          big.split_blocks = 1024;
          RunCase(big);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

// KIVI body units that multiply the packed codes (decode_kivi_codes.cuh), next to the per-token
// units of the same items in one launch: the KIVI presets and asym configs with a sink of 32 and
// key normalization, a 3-bit asym config that stays on the per-token path in the same batch, 1 to 8
// rows per KV head (GQA 1/2/4/8, 2 new tokens at GQA 4: causal rows within the step), bodies from
// one tile to 5000 tokens, D 64 and 128, fp16 and bf16; then the same batch with the tensor cores
// off. A batch with a sym KIVI config keeps the dequantizing units (or, at one row or bf16, the
// per-token path) for all its sequences.
TEST(KernelsGpu, KiviCodesBody) {
  SKIP_WITHOUT_GPU();
  const auto fmt = QuantFormat32;
  QuantConfig a;  // 2-bit asym, sink 32, key norm
  a.k = fmt(QuantMode::kAsym, 2, Grouping::kAlongTokens, 0, 64);
  a.v = fmt(QuantMode::kAsym, 2, Grouping::kAlongChannels, 40, 1);
  a.sink = 32;
  a.key_norm = true;
  QuantConfig b;  // 4-bit asym, other windows
  b.k = fmt(QuantMode::kAsym, 4, Grouping::kAlongTokens, 16, 32);
  b.v = fmt(QuantMode::kAsym, 4, Grouping::kAlongChannels, 7, 3);
  QuantConfig sym;  // sym keys: the batch keeps the dequantizing units
  sym.k = fmt(QuantMode::kSym, 2, Grouping::kAlongTokens, 0, 64);
  sym.v = fmt(QuantMode::kAsym, 2, Grouping::kAlongChannels, 40, 1);
  for (const QuantConfig* q : {&a, &b, &sym}) ASSERT_EQ(ValidateConfig(*q, 64), "");
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int gqa : {1, 2, 4, 8}) {
        const int n = gqa == 4 ? 2 : 1;
        Case cs;
        cs.hkv = 2;
        cs.hq = 2 * gqa;
        cs.d = d;
        cs.dt = dt;
        cs.seqs = KiviMixedBatch(a, b, n);
        cs.seed = 9950 + k++;
        cs.expect_decode = 1;
        cs.expect_imma = 1;
        cs.expect_kivi_codes = 1;
        cs.kivi_codes = true;
        cs.kivi_min_tokens = 0;
        RunOnAndOff(cs);
        if (HasFatalFailure()) return;
        if (gqa == 4 && dt == DType::kBF16) {  // own units for sinks and windows (as in ImmaBody)
          Case big = cs;
          big.split_blocks = 1024;
          RunCase(big);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
  for (DType dt : {DType::kF16, DType::kBF16}) {
    Case cs;
    cs.hkv = 2;
    cs.hq = 8;
    cs.dt = dt;
    cs.seqs = {SeqSpec(Preset::kKivi2, 3000, 1, 1, 33), SeqSpec(sym, 2000, 1, 1, 5)};
    cs.seed = 9990 + static_cast<int>(dt);
    cs.expect_decode = 1;
    cs.expect_imma = dt == DType::kF16 ? 1 : 0;
    cs.expect_kivi_codes = 0;
    cs.kivi_codes = true;
    cs.kivi_min_tokens = 0;
    RunCase(cs);
    if (HasFatalFailure()) return;
  }
}

// The KIVI code units where their precision is tested hardest: 32768 tokens (kivi2 and kivi4,
// fp16 and bf16, 1 / 4 / 8 rows), units of ~6k tokens
// (split over 2 blocks), queries 8x larger (a nearly one-hot softmax), and every ring depth from
// 2 to 6 stages.
TEST(KernelsGpu, KiviCodesPrecision) {
  SKIP_WITHOUT_GPU();
  int k = 0;
  for (Preset p : {Preset::kKivi2, Preset::kKivi4}) {
    for (int gqa : {1, 4, 8}) {
      SCOPED_TRACE(std::string("32k ") + PresetName(p) + " gqa " + std::to_string(gqa));
      Case c;
      c.hkv = 2;
      c.hq = 2 * gqa;
      c.dt = k % 2 == 0 ? DType::kF16 : DType::kBF16;
      c.seqs = {{p, 32768, 1, 1, 3}};
      c.seed = 5151 + k++;
      c.expect_decode = 1;
      c.expect_kivi_codes = 1;
      c.kivi_codes = true;
      c.kivi_min_tokens = 0;
      RunCase(c);
      if (HasFatalFailure()) return;
    }
  }
  for (int gqa : {1, 4}) {
    SCOPED_TRACE("long units, gqa " + std::to_string(gqa));
    Case c;
    c.hkv = 2;
    c.hq = 2 * gqa;
    c.seqs = {{Preset::kKivi2, 12000, 1, 1, 3}};
    c.seed = 5252 + gqa;
    c.expect_kivi_codes = 1;
    c.kivi_codes = true;
    c.split_blocks = 2;
    c.kivi_min_tokens = 0;
    RunCase(c);
    if (HasFatalFailure()) return;
  }
  for (Preset p : {Preset::kKivi2, Preset::kKivi4}) {
    for (int gqa : {1, 4}) {
      SCOPED_TRACE(std::string("sharp scores ") + PresetName(p) + " gqa " + std::to_string(gqa));
      Case c;
      c.hkv = 2;
      c.hq = 2 * gqa;
      c.q_scale = 8.f;
      c.seqs = {{p, 3000, 1, 1, 3}, {p, 700, 1, 1, 40}};
      c.seed = 5353 + k++;
      c.expect_kivi_codes = 1;
      c.kivi_codes = true;
      c.kivi_min_tokens = 0;
      RunCase(c);
      if (HasFatalFailure()) return;
    }
  }
  for (Preset p : {Preset::kKivi2, Preset::kKivi4}) {
    for (int stages = 2; stages <= 6; ++stages) {
      SCOPED_TRACE(std::string("ring ") + PresetName(p) + " stages " + std::to_string(stages));
      Case c;
      c.hkv = 2;
      c.hq = 8;
      c.d = k % 2 == 0 ? 128 : 64;
      c.seqs = {{p, 3000, 1, 1, 33}, {p, 600, 1, 1, 5}, {p, 170, 1, 1, 0}};
      c.seed = 5454 + k++;
      c.expect_kivi_codes = 1;
      c.kivi_codes = true;
      c.kivi_min_tokens = 0;
      c.ring_stages = stages;
      RunCase(c);
      if (HasFatalFailure()) return;
    }
  }
}

// fp16-preset batches on the fp16 / bf16 tensor cores (decode_mma.cuh): 1, 3, 4 and 8 rows per
// KV head (GQA 1/3/4/8, and 2 new tokens at GQA 4: causal rows within the step), lengths from 0 to
// 5000 with windows that start inside a page (tiles across page boundaries), tails shorter than a
// tile, a 32-token sink (tiles across the sink / window border), D 64 and 128, fp16 and bf16; then
// the same batch on the per-token path.
TEST(KernelsGpu, MmaFull) {
  SKIP_WITHOUT_GPU();
  // full precision with a sink: tokens in the sink page, then in the window (a prefill shorter
  // than the sink leaves it partly empty for the steps to fill)
  QuantConfig sink32 = PresetConfig(Preset::kFp16);
  sink32.sink = 32;
  ASSERT_EQ(ValidateConfig(sink32, 128), "");
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int gqa : {1, 3, 4, 8}) {
        const int n = gqa == 4 ? 2 : 1;
        Case cs;
        cs.hkv = 2;
        cs.hq = 2 * gqa;
        cs.d = d;
        cs.dt = dt;
        cs.seqs = {SeqSpec(Preset::kFp16, 5000, n, n, 33), SeqSpec(Preset::kFp16, 0, n, 1, 0),
                   SeqSpec(Preset::kFp16, 31, 1, n, 127), SeqSpec(Preset::kFp16, 1000, n, n, 64),
                   SeqSpec(Preset::kFp16, 129, 1, 1, 5),  SeqSpec(Preset::kFp16, 4095, n, 1, 100),
                   SeqSpec(sink32, 1500, n, n, 40),       SeqSpec(sink32, 31, n, 1, 0)};
        cs.seed = 9700 + k++;
        cs.expect_decode = 1;
        cs.expect_mma = 1;
        RunOnAndOff(cs);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// One query row per KV head on KIVI-layout values (along channels, 2 and 4 bits): the per-token
// path's dp4a value products (VChannelsStageDp4a); 3-bit values keep the fp32 path. D 64 and 128,
// fp16 and bf16, sym / asym / hybrid values, body lengths from one tile to 3000 tokens.
TEST(KernelsGpu, OneRowKiviValues) {
  SKIP_WITHOUT_GPU();
  const auto fmt = QuantFormat32;
  QuantConfig a;  // 4-bit hybrid values, full-precision keys
  a.v = fmt(QuantMode::kHybrid, 4, Grouping::kAlongChannels, 7, 1);
  QuantConfig b;  // 2-bit sym values, 3-bit along-tokens keys, sink 32
  b.k = fmt(QuantMode::kAsym, 3, Grouping::kAlongTokens, 0, 32);
  b.v = fmt(QuantMode::kSym, 2, Grouping::kAlongChannels, 16, 1);
  b.sink = 32;
  QuantConfig c;  // 3-bit values: the fp32 path in the same batch
  c.k = fmt(QuantMode::kAsym, 2, Grouping::kAlongTokens, 0, 128);
  c.v = fmt(QuantMode::kAsym, 3, Grouping::kAlongChannels, 128, 1);
  for (const QuantConfig* q : {&a, &b, &c}) ASSERT_EQ(ValidateConfig(*q, 64), "");
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      Case cs;
      cs.hkv = 3;
      cs.hq = 3;
      cs.d = d;
      cs.dt = dt;
      cs.seqs = {SeqSpec(Preset::kKivi2, 3000, 1, 1, 33), SeqSpec(Preset::kKivi4, 1200, 1, 1, 100),
                 SeqSpec(a, 700, 1, 1, 5),  SeqSpec(b, 450, 1, 1, 77),
                 SeqSpec(c, 1000, 1, 1, 9), SeqSpec(Preset::kKivi2, 160, 1, 1, 0)};  // one body tile
      cs.seed = 9500 + k++;
      cs.expect_decode = 1;
      RunCase(cs);
      if (HasFatalFailure()) return;
    }
  }
}

// The plan's ring for page units: two stages, also where three fit as many blocks (innerq2's
// pages at D = 128: on an H100 three stages fit five one-row or four 4-row blocks per SM, and the
// earlier rule took them). An innerq2 batch of two page-unit sequences with hq / hkv rows per unit.
Case PageRingDepthCase(int hq, int len0, int len1) {
  Case c;
  c.hkv = 2;
  c.hq = hq;
  c.seqs = {SeqSpec(Preset::kInnerQ2, len0, 1, 1, 33), SeqSpec(Preset::kInnerQ2, len1, 1, 1, 7)};
  c.expect_pages = 1;
  c.page_min_pages = 0;
  c.expect_stages = 2;
  return c;
}

// One row per unit, InnerQ-shaped formats of the IMMA bits (K along_channels, V along_tokens,
// G = 32): the whole body pages in page units (bulk copies into the block's ring of page slots,
// decode_pages.cuh). Bodies from none, one tile and just under one page to 5000 tokens, K bodies
// that end inside a tile (flush 1), sinks of 0 to 96, ring depths 2 and 3, few long units (many
// pages per block: every slot reused, both phase parities), every (D, dtype); then the same batch
// with the page units off must make none.
TEST(KernelsGpu, OneRowPages) {
  SKIP_WITHOUT_GPU();
  const ImmaConfigs ic = MakeImmaConfigs();
  const QuantConfig &a = ic.a, &b = ic.b, &e = ic.e, &f = ic.f;
  for (const QuantConfig* q : {&a, &b, &e, &f}) ASSERT_EQ(ValidateConfig(*q, 128), "");
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int split : {0, 6}) {
        Case cs;
        cs.hkv = 2;
        cs.hq = 2;
        cs.d = d;
        cs.dt = dt;
        cs.seqs = {SeqSpec(Preset::kInnerQ, 5000, 1, 1, 33), SeqSpec(Preset::kInnerQ2, 700, 1, 1, 100),
                   SeqSpec(Preset::kInnerQBase, 1300, 1, 1, 5), SeqSpec(a, 1000, 1, 1, 77),
                   SeqSpec(b, 2999, 1, 1, 5), SeqSpec(e, 230, 1, 1, 9), SeqSpec(f, 600, 1, 1, 40),
                   SeqSpec(a, 40, 1, 1, 0),    // one body tile
                   SeqSpec(a, 130, 1, 1, 0),   // a body just under one page
                   SeqSpec(Preset::kInnerQ, 17, 1, 1, 64)};  // no body
        cs.seed = 9950 + k++;
        cs.expect_decode = 1;
        cs.expect_imma = 0;
        cs.expect_pages = 1;
        cs.page_min_pages = 0;
        cs.split_blocks = split;
        cs.ring_stages = split == 0 ? 0 : 2 + k % 2;
        RunCase(cs);
        if (HasFatalFailure()) return;
      }
    }
  }
  RunCase(PageRingDepthCase(2, 3000, 1500));  // one row
  if (HasFatalFailure()) return;
  Case off;
  off.hkv = off.hq = 2;
  off.seqs = {SeqSpec(Preset::kInnerQ, 3000, 1, 1, 33), SeqSpec(Preset::kInnerQ2, 700, 1, 1, 5)};
  off.page_min_pages = 0;
  off.page_units = false;
  off.expect_pages = 0;
  RunCase(off);
  if (HasFatalFailure()) return;
  // the default rule: too few pages per resident block for this small batch
  Case few = off;
  few.page_units = true;
  few.page_min_pages = -1;
  RunCase(few);
  if (HasFatalFailure()) return;
  // not taken where they do not apply: a KIVI sequence in the batch, or more than 4 rows per unit
  Case kivi = off;
  kivi.page_units = true;
  kivi.seqs = {SeqSpec(Preset::kInnerQ, 3000, 1, 1, 33), SeqSpec(Preset::kKivi2, 700, 1, 1, 5)};
  RunCase(kivi);
  if (HasFatalFailure()) return;
  Case rows = kivi;
  rows.hq = 16;
  rows.seqs = {SeqSpec(Preset::kInnerQ, 3000, 1, 1, 33)};
  RunCase(rows);
}

// 2 to 4 query rows per unit (GQA, or a few query tokens per sequence), the same InnerQ-shaped
// formats: the whole body pages in page units whose tiles run on the IMMA units' tensor-core
// products (decode_imma.cuh) from the block's page ring instead of each warp's cp.async ring.
TEST(KernelsGpu, RowsPages) {
  SKIP_WITHOUT_GPU();
  const ImmaConfigs ic = MakeImmaConfigs();
  const QuantConfig &a = ic.a, &b = ic.b, &f = ic.f;
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int hq : {4, 6, 8}) {  // 2, 3, 4 rows per KV head
        Case cs;
        cs.hkv = 2;
        cs.hq = hq;
        cs.d = d;
        cs.dt = dt;
        cs.seqs = {SeqSpec(Preset::kInnerQ, 3000, 1, 1, 33), SeqSpec(Preset::kInnerQ2, 700, 1, 1, 100),
                   SeqSpec(Preset::kInnerQBase, 1300, 1, 1, 5), SeqSpec(a, 1000, 1, 1, 77),
                   SeqSpec(b, 2999, 1, 1, 5), SeqSpec(f, 600, 1, 1, 40),
                   SeqSpec(a, 130, 1, 1, 0),  // a body just under one page
                   SeqSpec(Preset::kInnerQ, 17, 1, 1, 64)};               // no body
        cs.seed = 9990 + k++;
        cs.expect_decode = 1;
        cs.expect_imma = 0;
        cs.expect_pages = 1;
        cs.page_min_pages = 0;
        cs.split_blocks = k % 2 == 0 ? 0 : 6;
        cs.ring_stages = k % 2 == 0 ? 0 : 2 + k % 3 / 2;
        RunCase(cs);
        if (HasFatalFailure()) return;
      }
    }
  }
  // two query tokens per sequence with one row each: 2 rows, causal within the new tokens
  Case two;
  two.hkv = two.hq = 2;
  two.seqs = {SeqSpec(Preset::kInnerQ, 2000, 2, 2, 33), SeqSpec(b, 1500, 2, 2, 5)};
  two.expect_pages = 1;
  two.page_min_pages = 0;
  RunCase(two);
  if (HasFatalFailure()) return;
  RunCase(PageRingDepthCase(8, 2000, 1100));  // 4 rows
  if (HasFatalFailure()) return;
  // page units off: the IMMA units take the same bodies
  Case off = two;
  off.page_units = false;
  off.expect_pages = 0;
  off.expect_imma = 1;
  RunCase(off);
  if (HasFatalFailure()) return;
  // the default rule: far fewer than 32 pages per resident block, so the IMMA units take them
  Case few = two;
  few.page_min_pages = -1;
  few.expect_pages = 0;
  few.expect_imma = 1;
  RunCase(few);
}

// The per-token units' full-precision tiles on the tensor cores (MmaTokTiles, the 4-row InnerQ and
// KIVI code units' tensor-core instances): sinks of 0 / 32 / 64 / 96 tokens and windows of every
// length around page and IMMA bodies, sequences without a body (every tile in full precision) and with a window
// shorter than a tile, 2 to 4 rows (two query tokens per sequence: causal within them), sharp
// scores (the maximum set by either kind of tile), D 64 and 128, fp16 and bf16; each case with the
// tiles on and off, the bodies first (the tiles' launches). On the emulated device the fp16 / bf16
// mma count shows that the tiles ran there (head_dim 128 only: the head_dim-64 instances have none).
TEST(KernelsGpu, MmaTokTiles) {
  SKIP_WITHOUT_GPU();
  const ImmaConfigs ic = MakeImmaConfigs();
  // the case with the tiles on, then off; count_mmas: no other fp16 / bf16 mma in its launches, so
  // the emulated device's count must grow exactly where the tiles exist (head_dim 128)
  auto on_and_off = [](Case c, bool count_mmas) {
    for (bool on : {true, false}) {
      SCOPED_TRACE(on ? "mma tiles on" : "mma tiles off");
      c.mma_tiles = on;
#if defined(KVQ_EMU_SUITE)
      const uint64_t mmas = kvq_emu::FloatMmas();
#endif
      RunCase(c);
      if (::testing::Test::HasFatalFailure()) return;
#if defined(KVQ_EMU_SUITE)
      if (count_mmas && on && c.d == 128) {
        EXPECT_GT(kvq_emu::FloatMmas(), mmas) << "the full-precision tiles on the tensor cores";
      } else if (count_mmas) {
        EXPECT_EQ(kvq_emu::FloatMmas(), mmas) << "no fp16 / bf16 mma with the tiles off or at head_dim 64";
      }
#else
      (void)count_mmas;
#endif
    }
  };
  int k = 0;
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int hq : {4, 6, 8}) {
        Case cs;
        cs.hkv = 2;
        cs.hq = hq;
        cs.d = d;
        cs.dt = dt;
        cs.seqs = {SeqSpec(Preset::kInnerQ, 3000, 1, 1, 33), SeqSpec(Preset::kInnerQ2, 700, 1, 1, 100),
                   SeqSpec(Preset::kInnerQBase, 1300, 1, 1, 5), SeqSpec(ic.b, 1000, 1, 1, 77),
                   SeqSpec(ic.e, 500, 1, 1, 3), SeqSpec(ic.f, 260, 1, 1, 40),
                   SeqSpec(Preset::kInnerQ2, 20, 1, 1, 64),   // no body: sink and window only
                   SeqSpec(ic.a, 90, 1, 1, 0)};               // windows shorter than a tile
        cs.seed = 12100 + k;
        cs.expect_decode = 1;
        cs.page_min_pages = k % 2 == 0 ? 0 : -1;  // page bodies, or IMMA ones
        cs.q_scale = k % 3 == 2 ? 6.f : 1.f;
        cs.bodies_first = 1;  // the tiles run where the bodies go first
        ++k;
        on_and_off(cs, true);
        if (HasFatalFailure()) return;
      }
    }
  }
  // two query tokens per sequence, two query heads per KV head: 4 rows, causal within the new tokens
  Case two;
  two.hkv = 2;
  two.hq = 4;
  two.seqs = {SeqSpec(Preset::kInnerQ, 2000, 2, 2, 33), SeqSpec(ic.b, 1500, 2, 2, 5),
              SeqSpec(Preset::kInnerQ2, 40, 2, 2, 10)};
  two.page_min_pages = 0;
  two.q_scale = 4.f;
  two.bodies_first = 1;
  RunCase(two);
  if (HasFatalFailure()) return;
  // the KIVI code units' 4-row instance (their body units multiply on the fp16 tensor cores too, so
  // the mma count does not tell the tiles apart here): the presets' windows (0-127 keys, 128 values),
  // a sink, and windows of several tiles per warp
  QuantConfig ks = PresetConfig(Preset::kKivi2);
  ks.sink = 32;
  QuantConfig kw;  // long windows: several full-precision tiles per warp
  kw.k = QuantFormat32(QuantMode::kAsym, 2, Grouping::kAlongTokens, 200, 128);
  kw.v = QuantFormat32(QuantMode::kAsym, 2, Grouping::kAlongChannels, 330, 1);
  kw.sink = 64;
  ASSERT_EQ(ValidateConfig(ks, 64), "");
  ASSERT_EQ(ValidateConfig(kw, 64), "");
  for (int d : {64, 128}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      Case kv;
      kv.hkv = 2;
      kv.hq = 8;
      kv.d = d;
      kv.dt = dt;
      kv.seqs = {SeqSpec(Preset::kKivi2, 3000, 1, 1, 33), SeqSpec(Preset::kKivi4, 1100, 1, 1, 5),
                 SeqSpec(ks, 700, 1, 1, 70), SeqSpec(Preset::kKivi2, 60, 1, 1, 9), SeqSpec(kw, 1500, 1, 1, 20)};
      kv.seed = 12200 + k++;
      kv.expect_decode = 1;
      kv.expect_kivi_codes = 1;
      kv.kivi_codes = true;
      kv.kivi_min_tokens = 0;
      kv.q_scale = d == 64 ? 5.f : 1.f;
      kv.bodies_first = 1;
      on_and_off(kv, false);
      if (HasFatalFailure()) return;
    }
  }
}

// Page units over consecutive decode steps: the step's flush lands in a page unit's pages when it
// completes one (innerq's values every 4th flush of 32; the custom sequence's keys, whose body
// trails its values', every 128 steps), and only then may that unit wait for the quantize-append
// (its reads are exactly its pages: UnitWaitsForQuantizeAppend without a tile margin). With PDL
// (the emulated device runs the units that skip the wait first), plainly, and as the fused step.
TEST(KernelsGpu, PageUnitsInSequence) {
  SKIP_WITHOUT_GPU();
  QuantConfig trail;  // keys with a longer window than the values: the key body is the shorter
  trail.k = QuantFormat32(QuantMode::kSym, 3, Grouping::kAlongChannels, 120, 1);
  trail.v = QuantFormat32(QuantMode::kHybrid, 2, Grouping::kAlongTokens, 10, 32);
  trail.sink = 32;
  trail.key_norm = true;
  ASSERT_EQ(ValidateConfig(trail, 128), "");
  for (int variant = 0; variant < 4; ++variant) {
    SCOPED_TRACE(variant == 0 ? "PDL launch" : variant == 1 ? "plain launch, no early pages" : variant == 2 ? "fused step"
                                                                            : "PDL launch, body units first");
    Case c;
    c.hkv = 2;
    c.hq = 2;
    c.seqs = {SeqSpec(Preset::kInnerQ, 700, 1, 1, 3), SeqSpec(trail, 1000, 1, 1, 0),
              SeqSpec(Preset::kInnerQ2, 400, 1, 1, 90)};
    c.seed = 7310 + variant;
    std::unique_ptr<CudaStepRunner> runner;
    ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
    runner->set_page_min_pages(0);
    runner->set_pdl(variant == 0 || variant == 3);
    runner->set_fused_step(variant == 2);
    runner->set_bodies_first(variant == 3 ? 1 : 0);
    runner->set_early_pages(variant != 1);  // the plain launch's page units read their first page's place
    std::mt19937 rng(c.seed);
    Arena a;
    std::vector<TSeq> seqs = MakeCaseSeqs(c, a, rng);
    int page_steps = 0;
    for (int step = 0; step < 140; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      RunAndCompare(c, a, &seqs, step == 0, rng, *runner);
      if (HasFatalFailure()) return;
      page_steps += runner->stats().page_units > 0 ? 1 : 0;
      EXPECT_EQ(runner->stats().bodies_first, variant == 3);
    }
    EXPECT_EQ(page_steps, 140) << "every step has page units";
  }
}

// The plan's unit order (set_bodies_first(-1), the default): a batch with more units than resident
// blocks, whose body units fit in one wave with free blocks beside them for its per-token units,
// puts the bodies first and launches as a programmatic dependent; a batch whose units all fit keeps
// the per-token units first; forcing either order gives the same outputs; with ~15 per-token units
// per free block, KIVI code units take the bodies first and InnerQ page units do not. Every step
// checked against the reference.
TEST(KernelsGpu, BodiesFirstPolicy) {
  SKIP_WITHOUT_GPU();
  int sms = 0;
  ASSERT_NO_FATAL_FAILURE(DeviceSms(&sms));
  struct Want {
    int num_seqs;
    int forced;  // -1 the plan, 0 around first, 1 bodies first
    bool bodies_first;
    Preset preset = Preset::kInnerQ;  // InnerQ: page units; KIVI: code units
    int hkv = 2;
    int rows = 1;      // query heads per KV head
    bool mma = true;   // CudaStepRunner::set_mma_tiles
  };
  auto run = [&](const Want& w, int* blocks_per_sm) {
    SCOPED_TRACE(std::string(PresetName(w.preset)) + " seqs " + std::to_string(w.num_seqs) + " KV heads " +
                 std::to_string(w.hkv) + " rows " + std::to_string(w.rows) + " mma tiles " +
                 std::to_string(w.mma) + " forced " + std::to_string(w.forced));
    const bool kivi = w.preset != Preset::kInnerQ;
    Case c;
    c.hkv = w.hkv;
    c.hq = w.hkv * w.rows;
    for (int i = 0; i < w.num_seqs; ++i) c.seqs.push_back(SeqSpec(w.preset, 600 + 37 * (i % 5), 1, 1, i % 3));
    c.seed = 6300 + w.num_seqs + w.forced + (kivi ? 50 : 0);
    std::unique_ptr<CudaStepRunner> runner;
    ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
    runner->set_page_min_pages(0);
    runner->set_kivi_mma_min_unit_tokens(0);
    runner->set_fused_step(false);
    runner->set_bodies_first(w.forced);
    runner->set_mma_tiles(w.mma);
    std::mt19937 rng(c.seed);
    Arena a;
    std::vector<TSeq> seqs = MakeCaseSeqs(c, a, rng);
    for (int step = 0; step < 3; ++step) {
      RunAndCompare(c, a, &seqs, step == 0, rng, *runner);
      if (HasFatalFailure()) return;
      if (step == 0) continue;  // the first step flushes the initial windows
      const CudaStepStats& st = runner->stats();
      SCOPED_TRACE("units " + std::to_string(st.num_units) + " pages " + std::to_string(st.page_units) +
                   " blocks per SM " + std::to_string(st.blocks_per_sm));
      if (kivi) {
        ASSERT_GT(st.imma_units, 0);
        ASSERT_TRUE(st.kivi_codes);
      } else {
        ASSERT_GT(st.page_units, 0);
      }
      *blocks_per_sm = st.blocks_per_sm;
      EXPECT_EQ(st.bodies_first, w.bodies_first);
      // the full-precision tiles on the tensor cores (4-row instance, head_dim 128): only beside
      // bodies that go first
      EXPECT_EQ(st.mma_tiles, w.mma && st.bodies_first && w.rows == 4);
      if (w.forced < 0 && w.bodies_first) {
        EXPECT_GT(st.num_units, sms * st.blocks_per_sm);
        EXPECT_TRUE(st.pdl);  // behind bodies that do not wait, the units that wait queue harmlessly
      }
    }
  };
  // one sequence of 2 KV heads: a body unit and a per-token unit each, all resident
  int bps = 0;
  run(Want{1, -1, false}, &bps);
  if (HasFatalFailure()) return;
  ASSERT_GT(bps, 0);
  // 0.7 x the resident blocks of items (2 per sequence): one body unit each, in one wave with free
  // blocks beside them, and as many per-token units, which overflow the wave
  const int many = std::max(2, (7 * sms * bps / 10 + 1) / 2);
  run(Want{many, -1, true}, &bps);
  run(Want{many, 0, false}, &bps);
  run(Want{1, 1, true}, &bps);
  // one KV head per sequence, one body unit each, one resident block in 16 free: ~15 per-token
  // units per free block. KIVI code units (issue-bound) take the bodies first up to 32 per free
  // block, InnerQ page units only up to 8.
  for (Preset p : {Preset::kInnerQ, Preset::kKivi2}) {
    if (HasFatalFailure()) return;
    int b = 0;
    run(Want{1, -1, false, p, 1}, &b);  // the instance's resident blocks per SM
    if (HasFatalFailure()) return;
    const int resident = sms * b;
    const int dense = resident - std::max(1, resident / 16);
    ASSERT_GT(dense, 8 * (resident - dense));
    run(Want{dense, -1, p == Preset::kKivi2, p, 1}, &b);
  }
  // 4 rows at head_dim 128: the InnerQ tensor-core instance's per-token units put their full-precision
  // tiles on the tensor cores, and then its page units go first up to 32 per free block as well
  // (with the tiles off, up to 8)
  for (bool mma : {true, false}) {
    if (HasFatalFailure()) return;
    int b = 0;
    run(Want{1, -1, false, Preset::kInnerQ, 1, 4, mma}, &b);
    if (HasFatalFailure()) return;
    const int resident = sms * b;
    const int dense = resident - std::max(1, resident / 16);
    ASSERT_GT(dense, 8 * (resident - dense));
    run(Want{dense, -1, mma, Preset::kInnerQ, 1, 4, mma}, &b);
  }
}

// One query row per KV head on the 4- and 8-row kernel instances (set_min_row_class): the units
// carry empty rows, and the plan takes the unit kinds of those instances (InnerQ on the IMMA units
// at 4 rows, KIVI on the code units, fp16 on the tensor cores). Then on the one-row instance with
// the rings 32 bytes past the aligned dynamic shared memory (set_ring_offset, whose experiment
// times the old placement at 48).
TEST(KernelsGpu, RowClassOneRow) {
  SKIP_WITHOUT_GPU();
  int k = 0;
  for (int rc : {4, 8, 1}) {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (Preset p : {Preset::kFp16, Preset::kKivi2, Preset::kKivi4, Preset::kInnerQ}) {
        Case cs;
        cs.hkv = 2;
        cs.hq = 2;
        cs.dt = dt;
        cs.seqs = {SeqSpec(p, 3000, 1, 1, 33), SeqSpec(p, 700, 1, 1, 5), SeqSpec(p, 33, 1, 1, 0)};
        cs.seed = 9900 + k++;
        cs.min_row_class = rc;
        cs.ring_offset = rc == 1 ? 32 : 0;  // 48, the old place, splits sectors: the emulator rejects it
        cs.expect_decode = 1;
        cs.kivi_min_tokens = 0;
        cs.kivi_codes = true;
        if (p == Preset::kFp16) cs.expect_mma = 1;
        if (p == Preset::kKivi2 || p == Preset::kKivi4) cs.expect_kivi_codes = 1;
        if (p == Preset::kInnerQ) cs.expect_imma = rc == 4 ? 1 : 0;
        RunCase(cs);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(KernelsGpu, RejectsUnsupportedAndBadInput) {
  SKIP_WITHOUT_GPU();
  std::unique_ptr<CudaStepRunner> runner;
  ASSERT_TRUE(CudaStepRunner::Create(&runner).ok());
  Arena a;
  std::mt19937 rng(5);
  QuantConfig cfg = PresetConfig(Preset::kKivi2);
  TSeq s = testing::MakeSeq(a, cfg, 2, 128, DType::kF16, 300, 0, rng);
  TStep st = testing::PlanStep(a, s, 2, 128, 1, 0, 0);
  StepParams p;
  p.num_q_heads = 4;
  p.num_kv_heads = 2;
  p.head_dim = 256;  // not built for the GPU
  Result r = runner->RunStep(p, &st.w, &cfg, 1, nullptr, nullptr);
  EXPECT_EQ(r.code, Code::kInvalidArgument);
  EXPECT_NE(r.message.find("head_dim"), std::string::npos) << r.message;
  p.head_dim = 128;
  SeqWork bad = st.w;
  bad.k.num_body_pages = 0;  // pages do not cover the flush
  r = runner->RunStep(p, &bad, &cfg, 1, nullptr, nullptr);
  EXPECT_EQ(r.code, Code::kInvalidArgument);
  EXPECT_NE(r.message.find("body pages"), std::string::npos) << r.message;
  QuantConfig eight = cfg;
  eight.k.bits = 8;
  EXPECT_NE(CudaSupports(p, &eight, 1), "");
  EXPECT_EQ(CudaSupports(p, &cfg, 1), "");
}

}  // namespace
}  // namespace kvq
