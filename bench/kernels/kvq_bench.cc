// kvq-bench kernels [--json] [--iters N] [--presets a,b,...] [--quick] [--generic] [--stages 2|3] [--no-imma] [--no-pages] [--no-early-pages] [--page-min-pages N] [--qa-carveout N]
//                   [--kivi-units codes|dequant] [--kivi-min-tokens N] [--split-blocks N] [--spread-blocks] [--bodies-first|--around-first] [--no-mma-tiles] [--row-class 1|4|8] [--ring-offset N] [--qa-steps N] [--pdl|--no-pdl] [--fused|--two-launches] [--qa-lanes auto|on|off] [--qa-same-chunks] [--qa-head auto|on|off] [--qa-wide auto|on|off] [--preflush] [--host-steps N] [--chain-dump] [--qa-trace] [--unit-trace] [--no-check] [--timing busy|idle] [--flush write|read] [--shape B,Hq,Hkv,T,D]...
// (--generic: force the generic attention kernel instead of the decode fast path, for comparison)
//
// Times the CUDA decode step (one query token per sequence) per preset on the shapes, with
// CUDA events, after a warm-up, medians over many runs, rotating over several independent caches
// so that L2 does not serve repeats:
//   - attention (split-KV + merge);
//   - quantize-append (one launch for the batch) of the timed step, and its mean over the 128
//     decode steps after it, where flushes count at their real rate (kivi2 quantizes its keys
//     every 128 steps, innerq its values every 32);
//   - the whole step (quantize-append then attention).
// Timing (--timing busy, the default): each timed launch is preceded on the same stream by a
// memset of a buffer of 4x L2, so L2 is cold and the GPU is still busy while the host enqueues the
// launch: the events bracket the kernels' GPU time, not the host's launch latency, which an idle
// stream adds to a single timed launch. --timing idle times single launches on an idle stream (the
// method of the results recorded before 2026-12-04). --flush read: the busy-timing buffer is read
// (a kernel that XORs it) instead of written, so L2 holds clean lines when the timed launch starts;
// after the memset (--flush write, the default and the method of every recorded table) the timed
// kernels' first misses also pay for writing back the L2's dirty lines, up to its whole size.
// Each row also checks the decode step's output: sequence 0 of the last cache set against the CPU
// reference (CpuAttention on a host copy of the arena), as the normalized error `err` (the GPU
// suite's bound is 2e-3 for fp16); a row above it is marked in the table. --no-check skips it.
// Bytes read are counted from the stored layout (codes + scales + zeros + sink + window +
// key-norm factors + q + o). The device-to-device copy bandwidth is measured in the same run
// (bytes read + bytes written) as the ceiling.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvq/cuda_ops.h"
#include "kvq/reference.h"
#include "scenario.h"

namespace kvq {
namespace bench {
// An empty grid (256 threads a block) that lets its programmatic dependents launch at once.
cudaError_t LaunchEmptyPrimary(dim3 grid, cudaStream_t stream);
cudaError_t FillRandomActs(void* p, int64_t n, uint64_t seed, bool bf16, int outlier_every,
                           cudaStream_t stream);
// Reads `bytes` (a multiple of 16) at p; writes *sink only for a value a memset fill never gives.
cudaError_t ReadFlush(const void* p, int64_t bytes, uint32_t* sink, cudaStream_t stream);
}  // namespace bench
}  // namespace kvq

namespace {

using kvq::Preset;

#define CHECK_CUDA(expr)                                                                  \
  do {                                                                                    \
    const cudaError_t e_ = (expr);                                                        \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "kvq-bench: %s failed: %s\n", #expr, cudaGetErrorString(e_)); \
      return false;                                                                       \
    }                                                                                     \
  } while (0)

#define CHECK_KVQ(expr)                                                             \
  do {                                                                              \
    const kvq::Result r_ = (expr);                                                  \
    if (!r_.ok()) {                                                                 \
      std::fprintf(stderr, "kvq-bench: %s failed: %s\n", #expr, r_.message.c_str()); \
      return false;                                                                 \
    }                                                                               \
  } while (0)

struct Shape {
  int b, hq, hkv, t, d;
};

struct Row {
  Shape s;
  std::string preset;
  double attn_us = 0, qa_us = 0, step_us = 0;
  double qa_avg_us = 0;  // quantize-append per decode step, mean over g_qa_steps consecutive steps
  // the same g_qa_steps steps whole (quantize-append + attention) and their attention alone, means:
  // qa_step_us = step_avg_us - attn_avg_us is what the quantize-append adds to a step (with PDL,
  // the attention units that read nothing it writes run beside it)
  double step_avg_us = 0, attn_avg_us = 0, qa_step_us = 0;
  // the same steps with an empty grid of the quantize-append's shape (one chunk) in its place:
  // what a launch in front of the attention costs a step by itself (mean - attn_avg_us)
  double empty_step_us = 0;
  // --preflush: the chain's flushes run after the attention of the step before (the flush-only
  // launch beside it, CudaStepRunner::RunStep's flush_after) and inside step_avg_us; qa_avg_us is
  // then the append alone, pf_avg_us that flush-only launch alone (plainly), mean over the steps
  // that ran it (not after a fused step: as the store's CUDA backend, the next step flushes then)
  double pf_avg_us = 0;
  int early_units = 0;  // units of the timed step that start without waiting for the quantize-append
  double bytes = 0;    // per attention step
  double gbps = 0;
  int sets = 0, units = 0, chunk = 0;
  std::string path;  // attention kernel the plan chose: decode (fast path) or generic
  double err = -1;   // normalized error of sequence 0 against the CPU reference (-1: not checked)
  // --host-steps N: the whole step from host memory (RunStepFromHost, as the store's CUDA backend
  // runs it), host wall time per call, medians: total and its phases (CudaStepStats::host_*); and
  // the floor of such a chain on this machine: the same bytes up, one empty launch, o down, sync.
  // host_copy_us: the same with o copied back instead of written into mapped host memory.
  double host_us = 0, host_prepare_us = 0, host_launch_us = 0, host_wait_us = 0, host_floor_us = 0;
  double host_copy_us = 0;
};

bool g_force_generic = false;  // --generic
int g_ring_stages = 0;         // --stages N (decode path ring; 0: the plan's choice)
bool g_imma = true;            // --no-imma: InnerQ body tiles and fp16 tiles on the per-token paths, not the tensor cores
bool g_pages = true;           // --no-pages: InnerQ body pages on the per-token path / IMMA units, not in page units
bool g_early_pages = true;     // --no-early-pages: CudaStepRunner::set_early_pages(false)
int g_qa_carveout = -2;        // --qa-carveout N: SetQuantizeAppendCarveout(N) before the runs (-2: not set)
int g_page_min_pages = -1;     // --page-min-pages N: CudaStepRunner::set_page_min_pages (-1: its default)
bool g_busy_timing = true;     // --timing busy|idle (header comment)
bool g_read_flush = false;     // --flush read (header comment)
// --qa-steps N: consecutive decode steps for the mean quantize-append and step (128: every flush
// phase of the presets; fewer on the emulated device, where each is a whole emulated step)
int g_qa_steps = 128;
int g_kivi_codes = -1;         // --kivi-units codes|dequant: KIVI body units on the codes
                               // (decode_kivi_codes.cuh) or dequantizing (decode_mma_kivi.cuh);
                               // -1: the runner's default
int g_kivi_min_tokens = -1;    // --kivi-min-tokens N: KIVI tensor-core units from N tokens per unit
bool g_spread_blocks = false;  // --spread-blocks: CudaStepRunner::set_spread_blocks
int g_bodies_first = -1;       // --bodies-first / --around-first: CudaStepRunner::set_bodies_first
bool g_mma_tiles = true;       // --no-mma-tiles: CudaStepRunner::set_mma_tiles(false)
int g_ring_offset = 0;         // --ring-offset N: CudaStepRunner::set_ring_offset
int g_min_row_class = 1;       // --row-class N: CudaStepRunner::set_min_row_class
int g_split_blocks = 0;        // --split-blocks N: units per launch at most N (0: the plan's capacity)
bool g_chain_dump = false;     // --chain-dump: the chain's steps one by one on stderr
bool g_qa_trace = false;       // --qa-trace: the quantize-append's phases per chain step (stderr)
bool g_unit_trace = false;     // --unit-trace: the decode units' phases, attention alone and the step (stderr)
int g_fused = -1;              // --fused / --two-launches: CudaStepRunner::set_fused_step (-1: the default)
int g_qa_lanes = -1;           // --qa-lanes auto|on|off: CudaStepRunner::set_qa_lanes (-1 the plan decides)
bool g_qa_split = true;        // off with --qa-same-chunks: CudaStepRunner::set_qa_split_chunks
int g_qa_head = -1;            // --qa-head auto|on|off: CudaStepRunner::set_qa_head (-1 its default)
int g_qa_wide = -1;            // --qa-wide auto|on|off: CudaStepRunner::set_qa_wide_carveout (-1 its default)
int g_pdl = -1;                // --pdl / --no-pdl: the attention as a programmatic dependent or plainly (-1: the plan's choice)
bool g_check = true;           // --no-check: no comparison with the CPU reference
bool g_preflush = false;       // --preflush: each chain step's flush beside the attention before it (Row::pf_avg_us)
int g_host_steps = 0;          // --host-steps N: N calls of RunStepFromHost timed on the host (Row::host_us)
constexpr double kErrBound = 2e-3;  // the GPU suite's bound for fp16 activations
void* g_flush = nullptr;       // the busy-timing buffer (4x L2)
size_t g_flush_bytes = 0;

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Bytes the attention reads for one sequence's state after the step.
double SeqBytes(const kvq::testing::TSeq& s, int hkv, int d) {
  const double fp_tok = double(hkv) * d * 2;
  double b = 0;
  for (int which = 0; which < 2; ++which) {
    const kvq::TensorFormat& f = which == 0 ? s.cfg.k : s.cfg.v;
    const kvq::testing::TStream& st = which == 0 ? s.k : s.v;
    const kvq::StreamLayout l = kvq::MakeStreamLayout(f, hkv, d);
    b += s.sink_len * fp_tok + st.win_len * fp_tok;
    if (f.quantized()) b += double(st.body_len) * l.quant_page_bytes / kvq::kPageTokens;
  }
  if (s.cfg.key_norm) b += double(hkv) * d * 4;
  return b;
}

bool MeasureCopy(double* gbps) {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(kvq::bench::FillRandomActs(a, bytes / 2, 1, false, 0, nullptr));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> ts;
  for (int i = 0; i < 12; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    CHECK_CUDA(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 2) ts.push_back(ms);
  }
  *gbps = 2.0 * bytes / (Median(ts) * 1e-3) / 1e9;
  cudaFree(a);
  cudaFree(b);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return true;
}

// Copies the arena regions one sequence reads in attention (sink, body and window pages of K and
// V, key-norm factors) from the device to the same offsets of a host image of the arena.
bool CopySeqPages(const uint8_t* d_arena, uint8_t* host, const kvq::SeqWork& w, const kvq::QuantConfig& cfg,
                  int hkv, int d) {
  auto copy = [&](int64_t off, int64_t bytes) -> bool {
    if (off < 0 || bytes <= 0) return true;
    CHECK_CUDA(cudaMemcpy(host + off, d_arena + off, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost));
    return true;
  };
  for (int t = 0; t < 2; ++t) {
    const kvq::StreamView& sv = t == 0 ? w.k : w.v;
    const kvq::StreamLayout L = kvq::MakeStreamLayout(t == 0 ? cfg.k : cfg.v, hkv, d);
    if (!copy(sv.sink_page, L.fp_page_bytes)) return false;
    for (int i = 0; i < sv.num_body_pages; ++i)
      if (!copy(sv.body_pages[i], L.quant_page_bytes)) return false;
    for (int i = 0; i < sv.num_win_pages; ++i)
      if (!copy(sv.win_pages[i], L.fp_page_bytes)) return false;
  }
  return copy(w.norm_offset, int64_t{hkv} * d * 4);
}

// --unit-trace: the prepared attention launch (what 0) and the whole step (what 2) of runner r, three
// times each with the decode units' phase stamps on (CudaStepRunner::set_unit_trace, kernels built
// with KVQ_UNIT_TRACE), summarized per unit kind on stderr: when units start (relative to the
// launch's first), their descriptor loads, their wait for the quantize-append, the first page,
// the body, the epilogue, the merge, and when they end. time(what, &us) runs one busy-timed launch.
template <typename TimeOnce>
bool UnitTrace(const Shape& sh, Preset preset, kvq::CudaStepRunner& r, TimeOnce&& time) {
  using kvq::CudaStepRunner;
  constexpr int S = CudaStepRunner::kUnitTraceSlots;
  if (!CudaStepRunner::unit_trace_built()) {
    std::fprintf(stderr, "kvq-bench: --unit-trace needs kernels built with -DKVQ_UNIT_TRACE=ON\n");
    return false;
  }
  const int n = r.stats().num_units;
  int64_t* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, size_t(n) * S * sizeof(int64_t)));
  std::vector<int64_t> t(size_t(n) * S);
  bool ok = true;
  for (int rep = 0; rep < 6 && ok; ++rep) {
    const int what = rep < 3 ? 0 : 2;
    CHECK_CUDA(cudaMemset(d, 0, t.size() * sizeof(int64_t)));
    r.set_unit_trace(d);
    float us = 0;
    ok = time(what, &us);
    r.set_unit_trace(nullptr);
    if (!ok) break;
    CHECK_CUDA(cudaMemcpy(t.data(), d, t.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
    int64_t t0 = INT64_MAX, t1 = 0;
    for (int u = 0; u < n; ++u) {
      const int64_t* x = t.data() + int64_t(u) * S;
      if (x[1] == 0) continue;
      t0 = std::min(t0, x[1]);
      t1 = std::max(t1, std::max(x[6], x[7]));
    }
    std::fprintf(stderr, "unittrace %d,%d,%d,%d %s %s: event %.2f us, units %d, first start to last end %.2f us\n", sh.b,
                 sh.hq, sh.hkv, sh.t, PresetName(preset), what == 0 ? "attn" : "step", us, n, (t1 - t0) / 1e3);
    // units that started in the first 2 us per SM, every kind: a unit's SM load
    std::vector<int> sm_load(1024, 0);
    for (int u = 0; u < n; ++u) {
      const int64_t* x = t.data() + int64_t(u) * S;
      if (x[1] != 0 && x[1] - t0 <= 2000) ++sm_load[x[0] & 0xff];
    }
    for (int kind = 0; kind < 3; ++kind) {
      // phases in us: start, desc, wait, first page, body, epilogue, merge, end
      std::vector<float> ph[8], tokens;
      int count = 0, waits = 0, merges = 0, late = 0;
      std::vector<int> per_sm(1024, 0);
      for (int u = 0; u < n; ++u) {
        const int64_t* x = t.data() + int64_t(u) * S;
        if (x[1] == 0 || ((x[0] >> 8) & 0xf) != kind) continue;
        ++count;
        waits += (x[0] >> 12) & 1;
        const bool merged = (x[0] >> 13) & 1;
        merges += merged;
        const float st = (x[1] - t0) / 1e3f;
        late += st > 2.f;
        if (st <= 2.f) ++per_sm[x[0] & 0xff];
        ph[0].push_back(st);
        tokens.push_back(static_cast<float>(x[0] >> 16));
        ph[1].push_back((x[2] - x[1]) / 1e3f);
        ph[2].push_back((x[3] - x[2]) / 1e3f);
        if (x[4] != 0) ph[3].push_back((x[4] - x[3]) / 1e3f);
        ph[4].push_back((x[5] - x[3]) / 1e3f);
        ph[5].push_back((x[6] - x[5]) / 1e3f);
        if (merged) ph[6].push_back((x[7] - x[6]) / 1e3f);
        ph[7].push_back((std::max(x[6], x[7]) - t0) / 1e3f);
      }
      if (count == 0) continue;
      auto q = [](std::vector<float> v, double f) {
        if (v.empty()) return 0.0;
        std::sort(v.begin(), v.end());
        return double(v[std::min(v.size() - 1, size_t(f * v.size()))]);
      };
      const int max_per_sm = *std::max_element(per_sm.begin(), per_sm.end());
      static const char* kKind[3] = {"tokens", "imma", "pages"};
      std::fprintf(stderr,
                   "  %-6s units %d (wait %d, merge %d, start > 2 us %d, at most %d per SM in the first 2 us, "
                   "tokens %.0f/%.0f): start %.2f/%.2f/%.2f desc %.2f/%.2f wait %.2f/%.2f first page %.2f/%.2f body %.2f/%.2f/%.2f "
                   "epilogue %.2f/%.2f merge %.2f/%.2f end %.2f/%.2f/%.2f (us: min or median/p90/max)\n",
                   kKind[kind], count, waits, merges, late, max_per_sm, q(tokens, 0.5), q(tokens, 1), q(ph[0], 0),
                   q(ph[0], 0.5), q(ph[0], 1),
                   q(ph[1], 0.5), q(ph[1], 1), q(ph[2], 0.5), q(ph[2], 1), q(ph[3], 0.5), q(ph[3], 1), q(ph[4], 0),
                   q(ph[4], 0.5), q(ph[4], 1), q(ph[5], 0.5), q(ph[5], 1), q(ph[6], 0.5), q(ph[6], 1), q(ph[7], 0.5),
                   q(ph[7], 0.9), q(ph[7], 1));
      // the per-token tiles' phases (SM cycles per warp tile, each unit's mean over its warps' tiles)
      std::vector<float> tph[4];
      for (int u = 0; u < n; ++u) {
        const int64_t* x = t.data() + int64_t(u) * S;
        if (x[1] == 0 || ((x[0] >> 8) & 0xf) != kind || x[12] <= 0) continue;
        for (int i = 0; i < 4; ++i) tph[i].push_back(static_cast<float>(x[8 + i]) / static_cast<float>(x[12]));
      }
      if (!tph[0].empty())
        std::fprintf(stderr,
                     "  %-6s per-token tiles (%zu units): cycles per warp tile: key scores %.0f/%.0f softmax %.0f/%.0f "
                     "value locations %.0f/%.0f values %.0f/%.0f (median/p90 of the units' means)\n",
                     kKind[kind], tph[0].size(), q(tph[0], 0.5), q(tph[0], 0.9), q(tph[1], 0.5), q(tph[1], 0.9),
                     q(tph[2], 0.5), q(tph[2], 0.9), q(tph[3], 0.5), q(tph[3], 0.9));
      // the full-precision tiles on the tensor cores (MmaTokTiles): slots 13 (cycles) and 14 (tiles)
      std::vector<float> mph;
      for (int u = 0; u < n; ++u) {
        const int64_t* x = t.data() + int64_t(u) * S;
        if (x[1] == 0 || ((x[0] >> 8) & 0xf) != kind || x[14] <= 0) continue;
        mph.push_back(static_cast<float>(x[13]) / static_cast<float>(x[14]));
      }
      if (!mph.empty())
        std::fprintf(stderr, "  %-6s mma tiles (%zu units): cycles per warp tile %.0f/%.0f (median/p90 of the units' means)\n",
                     kKind[kind], mph.size(), q(mph, 0.5), q(mph, 0.9));
      // the body and the end against how many units share the unit's SM (started in the first 2 us):
      // whether an SM's share of the bandwidth, not the unit's own work, sets when it ends
      std::fprintf(stderr, "  %-6s by units on the SM:", kKind[kind]);
      for (int load = 1; load <= 32; ++load) {
        std::vector<float> body, end;
        for (int u = 0; u < n; ++u) {
          const int64_t* x = t.data() + int64_t(u) * S;
          if (x[1] == 0 || ((x[0] >> 8) & 0xf) != kind || x[1] - t0 > 2000 || sm_load[x[0] & 0xff] != load) continue;
          body.push_back((x[5] - x[3]) / 1e3f);
          end.push_back((std::max(x[6], x[7]) - t0) / 1e3f);
        }
        if (!body.empty())
          std::fprintf(stderr, " %d: %zu units, body %.2f/%.2f end %.2f/%.2f;", load, body.size(), q(body, 0.5),
                       q(body, 1), q(end, 0.5), q(end, 1));
      }
      std::fprintf(stderr, " (us: median/max)\n");
    }
  }
  cudaFree(d);
  return ok;
}

bool RunShape(const Shape& sh, Preset preset, int iters, int64_t l2_bytes, Row* row) {
  using namespace kvq;
  const QuantConfig cfg = PresetConfig(preset);
  const DType dt = DType::kF16;
  // One set first, to size the rotation.
  testing::Arena probe(false);
  std::mt19937 rng(7);
  double set_bytes = 0;
  {
    testing::TSeq s = testing::MakeSeq(probe, cfg, sh.hkv, sh.d, dt, sh.t - 1, 0, rng);
    testing::TStep s1 = testing::PlanStep(probe, s, sh.hkv, sh.d, 0, 0, 0);
    testing::TStep s2 = testing::PlanStep(probe, s1.next, sh.hkv, sh.d, 1, 0, 0);
    set_bytes = SeqBytes(s2.next, sh.hkv, sh.d) * sh.b;
  }
  const double arena_per_set = double(probe.size()) * sh.b;
  int sets = static_cast<int>(std::ceil(4.0 * l2_bytes / std::max(set_bytes, 1.0)));
  sets = std::max(1, std::min(sets, 16));
  while (sets > 1 && arena_per_set * sets > 40e9) --sets;

  testing::Arena arena(false);
  std::vector<std::vector<testing::TStep>> step1(sets), step2(sets);
  std::vector<std::vector<SeqWork>> w1(sets), w2(sets);
  std::vector<QuantConfig> cfgs(sh.b, cfg);
  double bytes = 0;
  for (int k = 0; k < sets; ++k) {
    for (int i = 0; i < sh.b; ++i) {
      testing::TSeq s = testing::MakeSeq(arena, cfg, sh.hkv, sh.d, dt, sh.t - 1, 0, rng);
      step1[k].push_back(testing::PlanStep(arena, s, sh.hkv, sh.d, 0, 0, 0));
    }
    for (int i = 0; i < sh.b; ++i) {
      step2[k].push_back(testing::PlanStep(arena, step1[k][i].next, sh.hkv, sh.d, 1, i, i));
      if (k == 0) bytes += SeqBytes(step2[k][i].next, sh.hkv, sh.d);
    }
    for (auto& st : step1[k]) { st.Point(); w1[k].push_back(st.w); }
    for (auto& st : step2[k]) { st.Point(); w2[k].push_back(st.w); }
  }
  bytes += 2.0 * sh.b * sh.hq * sh.d * 2;  // q read, o written
  // The g_qa_steps decode steps after step 2 of set 0, for the quantize-append averaged over every
  // flush phase (planned now: their pages must be in the arena before it is allocated).
  // (--preflush: one more, whose flush the last step's flush-only launch writes)
  const int chain_len = g_qa_steps + (g_preflush ? 1 : 0);
  std::vector<std::vector<testing::TStep>> chain(chain_len);
  for (int j = 0; j < chain_len; ++j)
    for (int i = 0; i < sh.b; ++i)
      chain[j].push_back(testing::PlanStep(arena, j == 0 ? step2[0][i].next : chain[j - 1][i].next, sh.hkv, sh.d,
                                           1, i, i));

  uint8_t* d_arena = nullptr;
  void *d_q = nullptr, *d_k = nullptr, *d_v = nullptr, *d_o = nullptr;
  CHECK_CUDA(cudaMalloc(&d_arena, arena.size()));
  const int64_t qn = int64_t{sh.b} * sh.hq * sh.d, kvn = int64_t{sh.b} * sh.hkv * sh.d;
  CHECK_CUDA(cudaMalloc(&d_q, qn * 2));
  CHECK_CUDA(cudaMalloc(&d_o, qn * 2));
  CHECK_CUDA(cudaMalloc(&d_k, kvn * 2));
  CHECK_CUDA(cudaMalloc(&d_v, kvn * 2));
  CHECK_CUDA(bench::FillRandomActs(d_arena, arena.size() / 2, 11, false, 16, nullptr));
  CHECK_CUDA(bench::FillRandomActs(d_q, qn, 12, false, 0, nullptr));
  CHECK_CUDA(bench::FillRandomActs(d_k, kvn, 13, false, 16, nullptr));
  CHECK_CUDA(bench::FillRandomActs(d_v, kvn, 14, false, 0, nullptr));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  StepParams p;
  p.num_q_heads = sh.hq;
  p.num_kv_heads = sh.hkv;
  p.head_dim = sh.d;
  p.dtype = dt;
  p.q = d_q;
  p.k_new = d_k;
  p.v_new = d_v;
  p.o = d_o;
  std::vector<std::unique_ptr<CudaStepRunner>> runners(sets);
  for (int k = 0; k < sets; ++k) {
    CHECK_KVQ(CudaStepRunner::Create(&runners[k]));
    runners[k]->set_force_generic(g_force_generic);
    runners[k]->set_ring_stages(g_ring_stages);
    runners[k]->set_imma(g_imma);
    runners[k]->set_page_units(g_pages);
    runners[k]->set_early_pages(g_early_pages);
    if (g_page_min_pages >= 0) runners[k]->set_page_min_pages(g_page_min_pages);
    if (g_pdl >= 0) runners[k]->set_pdl(g_pdl == 1);
    if (g_fused >= 0) runners[k]->set_fused_step(g_fused == 1);
    runners[k]->set_qa_lanes(g_qa_lanes);
    runners[k]->set_qa_split_chunks(g_qa_split);
    runners[k]->set_qa_head(g_qa_head);
    runners[k]->set_qa_wide_carveout(g_qa_wide);
    if (g_kivi_codes >= 0) runners[k]->set_kivi_codes(g_kivi_codes == 1);
    if (g_kivi_min_tokens >= 0) runners[k]->set_kivi_mma_min_unit_tokens(g_kivi_min_tokens);
    if (g_split_blocks > 0) runners[k]->set_split_blocks(g_split_blocks);
    runners[k]->set_spread_blocks(g_spread_blocks);
    runners[k]->set_bodies_first(g_bodies_first);
    runners[k]->set_mma_tiles(g_mma_tiles);
    runners[k]->set_min_row_class(g_min_row_class);
    runners[k]->set_ring_offset(g_ring_offset);
    // Build the cache: flush the initial window into the body (no new tokens), then prepare the
    // decode step and run it once.
    CHECK_KVQ(runners[k]->QuantizeAppend(p, w1[k].data(), cfgs.data(), sh.b, d_arena, stream));
    CHECK_KVQ(runners[k]->Synchronize(stream));
    CHECK_KVQ(runners[k]->Prepare(p, w2[k].data(), cfgs.data(), sh.b, stream));
    CHECK_KVQ(runners[k]->LaunchPreparedStep(d_arena, stream));
    CHECK_KVQ(runners[k]->Synchronize(stream));
  }
  {  // The decode step's output is finite; sequence 0 of the last set (its step wrote o last)
     // against the CPU reference on a host copy of the arena.
    std::vector<uint16_t> o(qn);
    CHECK_CUDA(cudaMemcpy(o.data(), d_o, qn * 2, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < qn; ++i)
      if (!std::isfinite(testing::FromAct(o[i], dt))) {
        std::fprintf(stderr, "kvq-bench: non-finite output at %lld\n", static_cast<long long>(i));
        return false;
      }
    if (g_check) {
      const int64_t rows0 = int64_t{sh.hq} * sh.d;  // sequence 0: one query token
      // only sequence 0's pages are copied into the (otherwise untouched) host image of the arena
      std::unique_ptr<uint8_t[]> host(new uint8_t[arena.size()]);
      std::vector<uint16_t> q0(rows0), ref(rows0, 0);
      if (!CopySeqPages(d_arena, host.get(), w2[sets - 1][0], cfg, sh.hkv, sh.d)) return false;
      CHECK_CUDA(cudaMemcpy(q0.data(), d_q, rows0 * 2, cudaMemcpyDeviceToHost));
      StepParams hp = p;
      hp.q = q0.data();
      hp.o = ref.data();
      hp.k_new = hp.v_new = nullptr;
      CpuAttention(hp, &w2[sets - 1][0], cfgs.data(), 1, host.get(), 0);
      double num = 0, den = 0;
      for (int64_t i = 0; i < rows0; ++i) {
        const double g = testing::FromAct(o[i], dt), r = testing::FromAct(ref[i], dt);
        num += (g - r) * (g - r);
        den += r * r;
      }
      row->err = std::sqrt(num / std::max(den, 1e-30));
    }
  }
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  // One timed launch sequence on r, the flush buffer first written with `fill` (busy timing):
  // what = 0 attention, 1 quantize-append, 2 both (one decode step: LaunchPreparedStep, one launch
  // when the step is fused), 3 an empty grid
  // (LaunchEmptyPrimary) + attention. Repeating a prepared step is idempotent: the flush writes the
  // same codes to the same slots, the append the same rows.
  // (--preflush chain: the step of what = 2 includes the flush after its attention where prepared;
  // what = 4 is that flush alone, plainly)
  auto time_once = [&](CudaStepRunner& r, int what, int fill, float* us) -> bool {
    if (g_busy_timing && g_read_flush) {
      CHECK_CUDA(bench::ReadFlush(g_flush, static_cast<int64_t>(g_flush_bytes),
                                  reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(g_flush) + g_flush_bytes), stream));
    } else if (g_busy_timing) {
      CHECK_CUDA(cudaMemsetAsync(g_flush, fill & 0xff, g_flush_bytes, stream));
    }
    CHECK_CUDA(cudaEventRecord(e0, stream));
    if (what == 3) CHECK_CUDA(bench::LaunchEmptyPrimary(dim3(sh.b, sh.hkv, 2), stream));
    if (what == 1) CHECK_KVQ(r.LaunchPreparedQuantizeAppend(d_arena, stream));
    if (what == 2) CHECK_KVQ(r.LaunchPreparedStep(d_arena, stream));
    if (what == 4) CHECK_KVQ(r.LaunchPreparedFlush(d_arena, stream));
    if (what == 0 || what == 3) CHECK_KVQ(r.LaunchPreparedAttention(d_arena, stream));
    CHECK_CUDA(cudaEventRecord(e1, stream));
    CHECK_KVQ(r.Synchronize(stream));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    *us = ms * 1000.f;
    return true;
  };
  // the prepared step of every set in turn, 3 rounds of warm-up, then iters timings
  auto time_it = [&](int what, std::vector<float>* ts) -> bool {
    for (int i = 0; i < iters + 3 * sets; ++i) {
      float us = 0;
      if (!time_once(*runners[i % sets], what, i, &us)) return false;
      if (i >= 3 * sets) ts->push_back(us);
    }
    return true;
  };
  std::vector<float> ta, tq, tstep;
  if (!time_it(0, &ta) || !time_it(1, &tq) || !time_it(2, &tstep)) return false;
  if (g_unit_trace && !UnitTrace(sh, preset, *runners[0], [&](int what, float* us) {
        return time_once(*runners[0], what, 0, us);
      }))
    return false;
  for (auto& r : runners) CHECK_KVQ(r->Synchronize(stream));
  // Quantize-append of g_qa_steps consecutive decode steps (set 0 continues from its step 2), each
  // timed alone: the mean is the cost per decode step, flushes included at their real rate. Then
  // (repeating a prepared step is idempotent) the whole step and its attention alone, the same way.
  double qa_sum = 0, step_sum = 0, attn_sum = 0, empty_sum = 0, pf_sum = 0;
  auto add_once = [&](CudaStepRunner& r, int what, int j, double* sum) -> bool {
    float us = 0;
    if (!time_once(r, what, j, &us)) return false;
    *sum += us;
    return true;
  };
  // --qa-trace: each chain step's quantize-append launched once more alone (kind 0) and once more
  // as the whole step (kind 1, fused or not) with the phase stamps on (CudaStepRunner::set_qa_trace)
  int64_t* d_trace = nullptr;
  int64_t trace_cap = 0;
  std::vector<std::string> trace_lines;
  struct TraceSum {  // per kind, over the launches whose warps flushed: sums of their medians
    double phase[6] = {};  // desc, load, quant, store, tail, total (cycles)
    int launches = 0;
    double event = 0, span = 0, spread = 0;  // us
  } trace_sum[2];
  auto trace_once = [&](CudaStepRunner& r, int kind, int j) -> bool {
    constexpr int S = CudaStepRunner::kQaTraceSlots;
    const int64_t n = r.qa_trace_warps() * S;
    if (n > trace_cap) {
      if (d_trace) CHECK_CUDA(cudaFree(d_trace));
      CHECK_CUDA(cudaMalloc(&d_trace, n * sizeof(int64_t)));
      trace_cap = n;
    }
    CHECK_CUDA(cudaMemsetAsync(d_trace, 0, n * sizeof(int64_t), stream));
    r.set_qa_trace(d_trace);
    float us = 0;
    const bool ok = time_once(r, kind == 0 ? 1 : 2, j, &us);
    r.set_qa_trace(nullptr);
    if (!ok) return false;
    std::vector<int64_t> t(n);
    CHECK_CUDA(cudaMemcpy(t.data(), d_trace, n * sizeof(int64_t), cudaMemcpyDeviceToHost));
    std::vector<float> ph[6], gns, append_cycles;
    int64_t g0 = INT64_MAX, g1 = 0, s0max = 0;
    std::vector<int> sms;
    int started = 0;
    for (int64_t w = 0; w < n / S; ++w) {
      const int64_t* x = t.data() + w * S;
      if (x[0] == 0) continue;  // a block that never ran (fused: a head no unit claimed) or not yet
      ++started;
      g0 = std::min(g0, x[0]);
      s0max = std::max(s0max, x[0]);
      g1 = std::max(g1, x[7]);
      sms.push_back(static_cast<int>(x[8]));
      gns.push_back(static_cast<float>(x[7] - x[0]));
      if (x[9] > 0) {
        const int64_t d[6] = {x[2] - x[1], x[3] - x[2], x[4] - x[3], x[5] - x[4], x[6] - x[5], x[6] - x[1]};
        for (int k = 0; k < 6; ++k) ph[k].push_back(static_cast<float>(d[k]));
      } else {
        append_cycles.push_back(static_cast<float>(x[6] - x[1]));
      }
    }
    std::sort(sms.begin(), sms.end());
    const int num_sms = static_cast<int>(std::unique(sms.begin(), sms.end()) - sms.begin());
    const double span = started ? (g1 - g0) / 1000.0 : 0, spread = started ? (s0max - g0) / 1000.0 : 0;
    char buf[640];
    std::snprintf(buf, sizeof buf,
                  "qatrace %d,%d,%d,%d %s step %d %s%s: event %.2f us span %.2f start spread %.2f; warps %d (%zu flush) "
                  "on %d SMs; flushing warps' median cycles: desc %.0f load %.0f quant %.0f store %.0f tail %.0f "
                  "total %.0f (max %.0f); warp ns median %.0f max %.0f; append-only warps' median cycles %.0f\n",
                  sh.b, sh.hq, sh.hkv, sh.t, PresetName(preset), j, kind == 0 ? "qa" : "step",
                  r.stats().fused && kind == 1 ? " fused" : "", us, span, spread, started, ph[5].size(), num_sms,
                  Median(ph[0]), Median(ph[1]), Median(ph[2]), Median(ph[3]), Median(ph[4]), Median(ph[5]),
                  ph[5].empty() ? 0.0 : *std::max_element(ph[5].begin(), ph[5].end()), Median(gns),
                  gns.empty() ? 0.0 : *std::max_element(gns.begin(), gns.end()), Median(append_cycles));
    trace_lines.push_back(buf);
    if (!ph[5].empty()) {
      TraceSum& sum = trace_sum[kind];
      for (int k = 0; k < 6; ++k) sum.phase[k] += Median(ph[k]);
      ++sum.launches;
      sum.event += us;
      sum.span += span;
      sum.spread += spread;
    }
    return true;
  };
  // --preflush: the flush-only batch of chain step j (its state, n_new = 0), written after step
  // j - 1's attention (flush_done); chain step 0's flush once before the chain
  auto flush_only = [&](int j) {
    std::vector<SeqWork> w;
    for (auto& st : chain[j]) {
      st.Point();
      w.push_back(st.w);
      w.back().n_new = 0;
    }
    return w;
  };
  if (g_preflush) {
    const std::vector<SeqWork> w0 = flush_only(0);
    CHECK_KVQ(runners[0]->QuantizeAppend(p, w0.data(), cfgs.data(), sh.b, d_arena, stream));
    CHECK_KVQ(runners[0]->Synchronize(stream));
  }
  // As the runner decides it (RunStep's flush_after): not after a fused step, whose successor then
  // flushes as usual.
  bool flush_written = g_preflush;
  int pf_steps = 0;
  for (int j = 0; j < g_qa_steps; ++j) {
    std::vector<SeqWork> w;
    for (auto& st : chain[j]) {
      st.Point();
      w.push_back(st.w);
      w.back().flush_done = flush_written;
    }
    CudaStepRunner& r = *runners[0];
    const std::vector<SeqWork> wn = g_preflush ? flush_only(j + 1) : std::vector<SeqWork>();
    CHECK_KVQ(r.Prepare(p, w.data(), cfgs.data(), sh.b, stream, g_preflush ? wn.data() : nullptr));
    const bool flush_after = r.stats().flush_after;
    const double sums0[4] = {qa_sum, step_sum, attn_sum, empty_sum};
    if (!add_once(r, 1, j, &qa_sum) || !add_once(r, 2, j, &step_sum) || !add_once(r, 0, j, &attn_sum) ||
        !add_once(r, 3, j, &empty_sum))
      return false;
    if (flush_after && !add_once(r, 4, j, &pf_sum)) return false;  // the flush-only launch alone
    pf_steps += flush_after ? 1 : 0;
    flush_written = flush_after;
    if (g_chain_dump) {  // --chain-dump: each step of the chain (stderr), and the quantize-append
      // timed again right after itself (qa_again) and after the attention (qa_after_attn), the
      // same idempotent launch: what a kernel run just before it changes in its time
      double again = 0, after_attn = 0, attn2 = 0;
      if (!add_once(r, 1, j, &again) || !add_once(r, 0, j, &attn2) || !add_once(r, 1, j, &after_attn)) return false;
      std::fprintf(stderr, "chain %d,%d,%d,%d %s step %d: qa %.2f step %.2f attn %.2f empty %.2f us%s%s; qa_again %.2f "
                   "qa_after_attn %.2f%s%s\n", sh.b, sh.hq, sh.hkv, sh.t, PresetName(preset), j, qa_sum - sums0[0],
                   step_sum - sums0[1], attn_sum - sums0[2], empty_sum - sums0[3], r.stats().fused ? " fused" : "",
                   r.stats().pdl ? " pdl" : "", again, after_attn,
                   r.stats().qa_head ? " head" : "", r.stats().qa_wide ? " wide" : "");
    }
    if (g_qa_trace && (!trace_once(r, 0, j) || !trace_once(r, 1, j))) return false;
  }
  if (g_qa_trace) {
    for (const auto& l : trace_lines) std::fprintf(stderr, "%s", l.c_str());
    // per launch kind: the chain steps' medians averaged over the steps whose warps flushed
    for (int k = 0; k < 2; ++k) {
      const TraceSum& t = trace_sum[k];
      if (t.launches == 0) continue;
      const double n = t.launches;
      std::fprintf(stderr,
                   "qatrace %d,%d,%d,%d %s mean over %d flushing %s launches: event %.2f us span %.2f start spread "
                   "%.2f; flushing warps' median cycles: desc %.0f load %.0f quant %.0f store %.0f tail %.0f "
                   "total %.0f\n",
                   sh.b, sh.hq, sh.hkv, sh.t, PresetName(preset), t.launches, k == 0 ? "qa" : "step", t.event / n,
                   t.span / n, t.spread / n, t.phase[0] / n, t.phase[1] / n, t.phase[2] / n, t.phase[3] / n,
                   t.phase[4] / n, t.phase[5] / n);
    }
  }
  if (d_trace) cudaFree(d_trace);
  if (g_host_steps > 0) {
    // The last chain step again from host memory, on an idle stream: what the store's backend does
    // per layer (inputs in pageable host memory, o copied back, the stream synchronized).
    std::vector<uint16_t> hq(qn), hk(kvn), hv(kvn), ho(qn);
    CHECK_CUDA(cudaMemcpy(hq.data(), d_q, qn * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(hk.data(), d_k, kvn * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(hv.data(), d_v, kvn * 2, cudaMemcpyDeviceToHost));
    std::vector<SeqWork> w;
    for (auto& st : chain[g_qa_steps - 1]) {
      st.Point();
      w.push_back(st.w);
    }
    StepParams hp = p;
    hp.q = hq.data();
    hp.k_new = hk.data();
    hp.v_new = hv.data();
    hp.o = ho.data();
    CudaStepRunner& r = *runners[0];
    using Clock = std::chrono::steady_clock;
    std::vector<float> tot, pre, lau, wai, flo, tot_copy;
    const int warm = std::min(8, g_host_steps);
    std::vector<uint16_t> o_mapped;
    // o straight into mapped host memory (the default), then copied back (set_mapped_output(false))
    for (const bool mapped : {true, false}) {
      r.set_mapped_output(mapped);
      for (int i = 0; i < g_host_steps + warm; ++i) {
        const Clock::time_point t0 = Clock::now();
        CHECK_KVQ(r.RunStepFromHost(hp, qn * 2, kvn * 2, w.data(), cfgs.data(), sh.b, d_arena, stream));
        const Clock::time_point t1 = Clock::now();
        if (i < warm) continue;
        const float t = std::chrono::duration<float, std::micro>(t1 - t0).count();
        if (!mapped) {
          tot_copy.push_back(t);
          continue;
        }
        tot.push_back(t);
        pre.push_back(r.stats().host_prepare_us);
        lau.push_back(r.stats().host_launch_us);
        wai.push_back(r.stats().host_wait_us);
      }
      for (const uint16_t x : ho)
        if (!std::isfinite(testing::FromAct(x, dt))) {
          std::fprintf(stderr, "kvq-bench: non-finite output from RunStepFromHost\n");
          return false;
        }
      if (mapped) {
        o_mapped = ho;
      } else if (o_mapped != ho) {  // the same kernels: the same bits either way
        std::fprintf(stderr, "kvq-bench: RunStepFromHost's o differs between mapped and copied output\n");
        return false;
      }
    }
    r.set_mapped_output(true);
    // the floor: pinned staging of the same bytes up, one empty launch, o down, synchronize
    const size_t up = size_t(qn + 2 * kvn) * 2 + 4096, down = size_t(qn) * 2 + 256;
    void *h_up = nullptr, *h_down = nullptr, *d_up = nullptr;
    CHECK_CUDA(cudaMallocHost(&h_up, up));
    CHECK_CUDA(cudaMallocHost(&h_down, down));
    CHECK_CUDA(cudaMalloc(&d_up, up));
    std::memset(h_up, 1, up);
    for (int i = 0; i < g_host_steps + warm; ++i) {
      const Clock::time_point t0 = Clock::now();
      std::memcpy(h_up, hq.data(), qn * 2);
      CHECK_CUDA(cudaMemcpyAsync(d_up, h_up, up, cudaMemcpyHostToDevice, stream));
      CHECK_CUDA(bench::LaunchEmptyPrimary(dim3(sh.b, sh.hkv, 2), stream));
      CHECK_CUDA(cudaMemcpyAsync(h_down, d_up, down, cudaMemcpyDeviceToHost, stream));
      CHECK_CUDA(cudaStreamSynchronize(stream));
      std::memcpy(ho.data(), h_down, qn * 2);
      const Clock::time_point t1 = Clock::now();
      if (i >= warm) flo.push_back(std::chrono::duration<float, std::micro>(t1 - t0).count());
    }
    cudaFreeHost(h_up);
    cudaFreeHost(h_down);
    cudaFree(d_up);
    row->host_us = Median(tot);
    row->host_prepare_us = Median(pre);
    row->host_launch_us = Median(lau);
    row->host_wait_us = Median(wai);
    row->host_floor_us = Median(flo);
    row->host_copy_us = Median(tot_copy);
  }
  row->qa_avg_us = qa_sum / g_qa_steps;
  row->pf_avg_us = pf_steps > 0 ? pf_sum / pf_steps : 0;
  row->step_avg_us = step_sum / g_qa_steps;
  row->attn_avg_us = attn_sum / g_qa_steps;
  row->qa_step_us = row->step_avg_us - row->attn_avg_us;
  row->empty_step_us = empty_sum / g_qa_steps - row->attn_avg_us;
  row->s = sh;
  row->preset = PresetName(preset);
  row->attn_us = Median(ta);
  row->qa_us = Median(tq);
  row->step_us = Median(tstep);
  row->bytes = bytes;
  row->gbps = bytes / (row->attn_us * 1e-6) / 1e9;
  row->sets = sets;
  row->units = runners[0]->stats().num_units;
  row->early_units = runners[0]->stats().early_units;
  row->chunk = runners[0]->stats().chunk_tokens;
  {
    const CudaStepStats& st = runners[0]->stats();
    // decode-s<stages>-b<blocks per SM>[-imma|-kmma|-kcodes|-mma|-pages]: the decode path's ring depth,
    // the occupancy the plan used, and whether InnerQ body tiles (-imma), KIVI body tiles (-kmma
    // dequantized, -kcodes on the codes) or the fp16 preset's tiles (-mma) ran on the tensor cores,
    // or InnerQ body pages in page units (-pages);
    // +pdl: the attention launched as a programmatic dependent; +bf: the body units first; +wide: the
    // quantize-append's kernels at the largest shared-memory carveout; -rN: --row-class N; -oN: --ring-offset N
    row->path = st.decode_path ? "decode-s" + std::to_string(st.ring_stages) + "-b" + std::to_string(st.blocks_per_sm) +
                                     (st.imma_units > 0 ? (st.kivi_codes ? "-kcodes" : st.kivi_mma ? "-kmma" : "-imma")
                                                       : st.mma_full ? "-mma" : st.page_units > 0 ? "-pages" : "")
                               : "generic";
    if (st.pdl) row->path += "+pdl";  // launched as a programmatic dependent of the quantize-append
    if (st.fused) row->path += "+fused";  // the step is one launch, the quantize-append inside
    if (st.bodies_first) row->path += "+bf";  // the body units first in the grid (set_bodies_first)
    if (!g_mma_tiles) row->path += "-nomt";  // --no-mma-tiles
    if (st.qa_wide) row->path += "+wide";  // the quantize-append's largest carveout (set_qa_wide_carveout)
    if (g_min_row_class > 1) row->path += "-r" + std::to_string(g_min_row_class);  // --row-class
    if (g_ring_offset > 0) row->path += "-o" + std::to_string(g_ring_offset);      // --ring-offset
    if (g_preflush) row->path += "+preflush";  // the chain's flushes beside the attention before
  }
  runners.clear();
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaStreamDestroy(stream);
  cudaFree(d_arena);
  cudaFree(d_q);
  cudaFree(d_k);
  cudaFree(d_v);
  cudaFree(d_o);
  return true;
}

int Usage() {
  std::fprintf(stderr,
               "usage: kvq-bench kernels [--json] [--iters N] [--presets fp16,kivi2,...] [--quick] [--generic] [--stages 2|3] [--no-imma] [--no-pages] [--no-early-pages] [--page-min-pages N] [--qa-carveout N] [--kivi-units codes|dequant] [--kivi-min-tokens N] [--split-blocks N] [--spread-blocks] [--bodies-first|--around-first] [--no-mma-tiles] [--row-class 1|4|8] [--ring-offset N] [--qa-steps N] [--pdl|--no-pdl] [--fused|--two-launches] [--qa-lanes auto|on|off] [--qa-same-chunks] [--qa-head auto|on|off] [--qa-wide auto|on|off] [--preflush] [--host-steps N] [--chain-dump] [--qa-trace] [--unit-trace] [--no-check] [--timing busy|idle] [--flush write|read] [--shape B,Hq,Hkv,T,D]...\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) != "kernels") return Usage();
  bool json = false, quick = false;
  std::vector<Shape> custom;
  int iters = 50;
  std::vector<Preset> presets = {Preset::kFp16, Preset::kKivi2, Preset::kKivi4,
                                 Preset::kInnerQ, Preset::kInnerQ2, Preset::kInnerQBase};
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--generic") {
      g_force_generic = true;
    } else if (a == "--shape" && i + 1 < argc) {
      Shape sh{};
      if (std::sscanf(argv[++i], "%d,%d,%d,%d,%d", &sh.b, &sh.hq, &sh.hkv, &sh.t, &sh.d) != 5 || sh.b < 1 ||
          sh.hkv < 1 || sh.hq % sh.hkv != 0 || sh.t < 2 || (sh.d != 64 && sh.d != 128)) {
        std::fprintf(stderr, "kvq-bench: --shape wants B,Hq,Hkv,T,D (D 64 or 128)\n");
        return 2;
      }
      custom.push_back(sh);
    } else if (a == "--no-imma") {
      g_imma = false;
    } else if (a == "--qa-carveout" && i + 1 < argc) {
      g_qa_carveout = std::atoi(argv[++i]);
    } else if (a == "--no-pages") {
      g_pages = false;
    } else if (a == "--page-min-pages" && i + 1 < argc) {
      g_page_min_pages = std::atoi(argv[++i]);
    } else if (a == "--kivi-units" && i + 1 < argc) {
      const std::string u = argv[++i];
      if (u != "codes" && u != "dequant") return Usage();
      g_kivi_codes = u == "codes" ? 1 : 0;
    } else if (a == "--kivi-min-tokens" && i + 1 < argc) {
      g_kivi_min_tokens = std::max(0, std::atoi(argv[++i]));
    } else if (a == "--split-blocks" && i + 1 < argc) {
      g_split_blocks = std::max(0, std::atoi(argv[++i]));
    } else if (a == "--ring-offset" && i + 1 < argc) {
      g_ring_offset = std::atoi(argv[++i]);
    } else if (a == "--qa-steps" && i + 1 < argc) {
      g_qa_steps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--row-class" && i + 1 < argc) {
      g_min_row_class = std::atoi(argv[++i]);
    } else if (a == "--spread-blocks") {
      g_spread_blocks = true;
    } else if (a == "--no-early-pages") {
      g_early_pages = false;
    } else if (a == "--unit-trace") {
      g_unit_trace = true;
    } else if (a == "--bodies-first") {
      g_bodies_first = 1;
    } else if (a == "--around-first") {
      g_bodies_first = 0;
    } else if (a == "--no-mma-tiles") {
      g_mma_tiles = false;
    } else if (a == "--chain-dump") {
      g_chain_dump = true;
    } else if (a == "--qa-trace") {
      g_qa_trace = true;
    } else if (a == "--fused") {
      g_fused = 1;
    } else if (a == "--two-launches") {
      g_fused = 0;
    } else if ((a == "--qa-lanes" || a == "--qa-head" || a == "--qa-wide") && i + 1 < argc) {
      const std::string m = argv[++i];
      if (m != "auto" && m != "on" && m != "off") {
        std::fprintf(stderr, "kvq-bench: %s takes auto, on or off\n", a.c_str());
        return 2;
      }
      int& mode = a == "--qa-lanes" ? g_qa_lanes : a == "--qa-head" ? g_qa_head : g_qa_wide;
      mode = m == "auto" ? -1 : m == "on" ? 1 : 0;
    } else if (a == "--qa-same-chunks") {
      g_qa_split = false;
    } else if (a == "--no-pdl") {
      g_pdl = 0;
    } else if (a == "--pdl") {
      g_pdl = 1;
    } else if (a == "--preflush") {
      g_preflush = true;
    } else if (a == "--host-steps" && i + 1 < argc) {
      g_host_steps = std::max(0, std::atoi(argv[++i]));
    } else if (a == "--no-check") {
      g_check = false;
    } else if (a == "--timing" && i + 1 < argc) {
      const std::string m = argv[++i];
      if (m != "busy" && m != "idle") return Usage();
      g_busy_timing = m == "busy";
    } else if (a == "--flush" && i + 1 < argc) {
      const std::string m = argv[++i];
      if (m != "write" && m != "read") return Usage();
      g_read_flush = m == "read";
    } else if (a == "--stages" && i + 1 < argc) {
      g_ring_stages = std::atoi(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--presets" && i + 1 < argc) {
      std::string bad;
      if (!kvq::testing::ParsePresetList(argv[++i], &presets, &bad)) {
        std::fprintf(stderr, "kvq-bench: unknown preset '%s'\n", bad.c_str());
        return 2;
      }
    } else {
      return Usage();
    }
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "kvq-bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return 1;
  if (g_qa_carveout >= -1) {
    const kvq::Result r = kvq::SetQuantizeAppendCarveout(g_qa_carveout);
    if (!r.ok()) {
      std::fprintf(stderr, "kvq-bench: %s\n", r.message.c_str());
      return 1;
    }
  }
  std::vector<Shape> shapes = {{1, 32, 32, 4096, 128},  {1, 32, 32, 32768, 128}, {16, 32, 32, 4096, 128},
                               {16, 32, 8, 32768, 128}, {64, 32, 8, 8192, 128},  {1, 9, 3, 8192, 64}};
  if (quick) shapes = {{1, 32, 32, 32768, 128}, {16, 32, 8, 32768, 128}};
  if (!custom.empty()) shapes = custom;
  double copy = 0;
  if (!MeasureCopy(&copy)) return 1;
  g_flush_bytes = std::max<size_t>(size_t{4} * prop.l2CacheSize, size_t{256} << 20);
  // (+16 bytes: the read flush's sink word)
  if (g_busy_timing && (cudaMalloc(&g_flush, g_flush_bytes + 16) != cudaSuccess ||
                        cudaMemset(g_flush, 0x5a, g_flush_bytes + 16) != cudaSuccess)) {
    std::fprintf(stderr, "kvq-bench: cannot allocate the %zu-byte timing buffer\n", g_flush_bytes);
    return 1;
  }
  std::vector<Row> rows;
  for (const Shape& s : shapes)
    for (Preset p : presets) {
      Row r;
      if (!RunShape(s, p, iters, prop.l2CacheSize, &r)) return 1;
      rows.push_back(r);
      std::fprintf(stderr, "  done B=%d Hq=%d Hkv=%d T=%d D=%d %s\n", s.b, s.hq, s.hkv, s.t, s.d, r.preset.c_str());
    }
  if (json) {
    std::printf("{\"device\": \"%s\", \"copy_gbps\": %.1f, \"timing\": \"%s\", \"rows\": [\n", prop.name, copy,
                !g_busy_timing ? "idle" : g_read_flush ? "busy-read" : "busy");
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::printf("  {\"b\": %d, \"hq\": %d, \"hkv\": %d, \"t\": %d, \"d\": %d, \"preset\": \"%s\", "
                  "\"attn_us\": %.2f, \"bytes\": %.0f, \"gbps\": %.1f, \"copy_frac\": %.3f, "
                  "\"qa_us\": %.2f, \"qa_avg_us\": %.2f, \"step_us\": %.2f, \"step_avg_us\": %.2f, \"attn_avg_us\": %.2f, "
                  "\"qa_step_us\": %.2f, \"empty_step_us\": %.2f, \"pf_avg_us\": %.2f, \"early_units\": %d, \"sets\": %d, \"units\": %d, \"chunk\": %d, \"kernel\": \"%s\", "
                  "\"err\": %.3g, \"host_us\": %.2f, \"host_prepare_us\": %.2f, \"host_launch_us\": %.2f, "
                  "\"host_wait_us\": %.2f, \"host_floor_us\": %.2f, \"host_copy_us\": %.2f}%s\n",
                  r.s.b, r.s.hq, r.s.hkv, r.s.t, r.s.d, r.preset.c_str(), r.attn_us, r.bytes, r.gbps,
                  r.gbps / copy, r.qa_us, r.qa_avg_us, r.step_us, r.step_avg_us, r.attn_avg_us, r.qa_step_us,
                  r.empty_step_us, r.pf_avg_us, r.early_units, r.sets, r.units, r.chunk, r.path.c_str(), r.err,
                  r.host_us, r.host_prepare_us, r.host_launch_us, r.host_wait_us, r.host_floor_us, r.host_copy_us,
                  i + 1 < rows.size() ? "," : "");
    }
    std::printf("]}\n");
  } else {
    std::printf("device: %s, device-to-device copy bandwidth: %.1f GB/s (read + write)\n", prop.name, copy);
    std::printf("decode step, fp16 activations, one query token per sequence; medians of %d runs; timing %s\n", iters,
                !g_busy_timing  ? "idle (single launches on an idle stream)"
                : g_read_flush ? "busy-read (GPU time, L2 cold and clean: read flush)"
                               : "busy (GPU time, cold L2)");
    std::printf("qapp_us: quantize-append of the timed step; qa_avg_us: its mean over %d consecutive decode steps\n"
                "(every flush phase), qa/attn = qa_avg_us / attn_us; step_us: quantize-append + attention;\n"
                "qa_step: what the quantize-append adds to a step, the mean step minus the mean attention over\n"
                "the same steps (with PDL the units that read nothing it writes run beside it), in_step = qa_step / attn_us\n",
                g_qa_steps);
    std::printf("err: normalized error of sequence 0 against the CPU reference (* above the GPU suite's %.0e)\n",
                kErrBound);
    if (g_preflush)
      std::printf("--preflush: each chain step's flush runs beside the attention of the step before it (inside step and\n"
                  "qa_step); qa_avg_us is the append alone; the flush-only launch alone: pf_avg_us in --json\n");
    std::printf("%-4s %-4s %-4s %-6s %-4s %-12s %10s %12s %9s %7s %9s %9s %8s %9s %8s %8s %9s  %s\n", "B", "Hq", "Hkv",
                "T", "D", "preset", "attn_us", "bytes_read", "GB/s", "%copy", "qapp_us", "qa_avg_us", "qa/attn", "step_us",
                "qa_step", "in_step", "err", "kernel");
    for (const Row& r : rows)
      std::printf("%-4d %-4d %-4d %-6d %-4d %-12s %10.2f %12.0f %9.1f %6.1f%% %9.2f %9.2f %7.1f%% %9.2f %8.2f %7.1f%% %8.1e%s  %s\n",
                  r.s.b, r.s.hq, r.s.hkv, r.s.t, r.s.d, r.preset.c_str(), r.attn_us, r.bytes, r.gbps,
                  100.0 * r.gbps / copy, r.qa_us, r.qa_avg_us, 100.0 * r.qa_avg_us / r.attn_us, r.step_us, r.qa_step_us,
                  100.0 * r.qa_step_us / r.attn_us, r.err, r.err > kErrBound ? "*" : " ", r.path.c_str());
    if (g_host_steps > 0) {
      std::printf("\n--host-steps %d: RunStepFromHost (the store backend's step: inputs from host memory, o back,\n"
                  "synchronized) on an idle stream, host wall time medians; prepare / launch / wait: its phases\n"
                  "(CudaStepStats::host_*); o written into mapped host memory (the default); copy_out: the same\n"
                  "with o copied back (set_mapped_output(false)); floor: the same bytes up, one empty launch,\n"
                  "o down, synchronize; step_us above: the same step's GPU time\n", g_host_steps);
      std::printf("%-4s %-4s %-4s %-6s %-4s %-12s %9s %9s %9s %9s %9s %9s %9s\n", "B", "Hq", "Hkv", "T", "D", "preset",
                  "host_us", "prepare", "launch", "wait", "copy_out", "floor", "step_us");
      for (const Row& r : rows)
        std::printf("%-4d %-4d %-4d %-6d %-4d %-12s %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f\n", r.s.b, r.s.hq,
                    r.s.hkv, r.s.t, r.s.d, r.preset.c_str(), r.host_us, r.host_prepare_us, r.host_launch_us,
                    r.host_wait_us, r.host_copy_us, r.host_floor_us, r.step_us);
    }
  }
  if (g_flush) cudaFree(g_flush);
  return 0;
}
