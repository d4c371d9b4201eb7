// kvq-bench-plan [--iters N] [--new N] [--presets a,b,...] [--shape B,Hq,Hkv,T,D]...
//
// The host time of CudaStepRunner::Prepare (the split plan, the descriptors and their upload's
// enqueue) per shape and preset, on the emulated CUDA runtime (tests/emu): no driver, so what it
// prints is the planning's own CPU cost, the part of the store's per-layer step that the host
// spends before the GPU can start (kvq-bench --host-steps measures the whole step on a GPU). The
// state is the benchmark's: a sequence of T - 1 tokens whose window was flushed into the body, then
// one step of --new tokens (1: decode); its flush after the attention is planned too.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvq/cuda_ops.h"
#include "scenario.h"

namespace {

struct Shape {
  int b, hq, hkv, t, d;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

int Usage() {
  std::fprintf(stderr, "usage: kvq-bench-plan [--iters N] [--new N] [--presets fp16,kivi2,...] [--shape B,Hq,Hkv,T,D]...\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvq;
  int iters = 200;
  int n_new = 1;
  std::vector<Preset> presets = {Preset::kFp16, Preset::kKivi2, Preset::kKivi4, Preset::kInnerQ};
  std::vector<Shape> shapes;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) {
      iters = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--new" && i + 1 < argc) {
      n_new = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--shape" && i + 1 < argc) {
      Shape sh{};
      if (std::sscanf(argv[++i], "%d,%d,%d,%d,%d", &sh.b, &sh.hq, &sh.hkv, &sh.t, &sh.d) != 5 || sh.b < 1 ||
          sh.hkv < 1 || sh.hq % sh.hkv != 0 || sh.t < 2 || (sh.d != 64 && sh.d != 128))
        return Usage();
      shapes.push_back(sh);
    } else if (a == "--presets" && i + 1 < argc) {
      std::string bad;
      if (!testing::ParsePresetList(argv[++i], &presets, &bad)) {
        std::fprintf(stderr, "kvq-bench-plan: unknown preset '%s'\n", bad.c_str());
        return 2;
      }
    } else {
      return Usage();
    }
  }
  if (shapes.empty())
    shapes = {{1, 9, 3, 8192, 64}, {1, 32, 32, 32768, 128}, {16, 32, 8, 32768, 128}, {64, 32, 8, 8192, 128}};
  std::printf("CudaStepRunner::Prepare, host time per call (emulated runtime: no driver), median of %d; %d new token(s)\n",
              iters, n_new);
  std::printf("plan: a hash of the descriptors and the plan's choices (equal across a change of the planner that\n"
              "keeps its plans)\n");
  std::printf("%-4s %-4s %-4s %-6s %-4s %-8s %10s %10s %8s  %s\n", "B", "Hq", "Hkv", "T", "D", "preset", "prepare_us",
              "+flush_us", "units", "plan");
  for (const Shape& sh : shapes)
    for (const Preset preset : presets) {
      const QuantConfig cfg = PresetConfig(preset);
      testing::Arena arena(false);
      std::mt19937 rng(7);
      std::vector<testing::TStep> s1, s2, s3;
      for (int i = 0; i < sh.b; ++i) {
        testing::TSeq s = testing::MakeSeq(arena, cfg, sh.hkv, sh.d, DType::kF16, sh.t - 1, 0, rng);
        s1.push_back(testing::PlanStep(arena, s, sh.hkv, sh.d, 0, 0, 0));
      }
      for (int i = 0; i < sh.b; ++i)
        s2.push_back(testing::PlanStep(arena, s1[i].next, sh.hkv, sh.d, n_new, int64_t{i} * n_new, int64_t{i} * n_new));
      for (int i = 0; i < sh.b; ++i) s3.push_back(testing::PlanStep(arena, s2[i].next, sh.hkv, sh.d, 0, 0, 0));
      std::vector<SeqWork> w, f;
      for (auto& st : s2) {
        st.Point();
        w.push_back(st.w);
      }
      for (auto& st : s3) {
        st.Point();
        f.push_back(st.w);
      }
      std::vector<QuantConfig> cfgs(sh.b, cfg);
      std::unique_ptr<CudaStepRunner> r;
      const Result cr = CudaStepRunner::Create(&r);
      if (!cr.ok()) {
        std::fprintf(stderr, "kvq-bench-plan: %s\n", cr.message.c_str());
        return 1;
      }
      const int64_t qn = int64_t{sh.b} * n_new * sh.hq * sh.d, kvn = int64_t{sh.b} * n_new * sh.hkv * sh.d;
      std::vector<uint16_t> q(qn), k(kvn), v(kvn), o(qn);
      StepParams p;
      p.num_q_heads = sh.hq;
      p.num_kv_heads = sh.hkv;
      p.head_dim = sh.d;
      p.dtype = DType::kF16;
      p.q = q.data();
      p.k_new = k.data();
      p.v_new = v.data();
      p.o = o.data();
      double med[2] = {0, 0};
      uint64_t hash = 1469598103934665603ull;  // FNV-1a over both plans' descriptors and choices
      auto mix = [&](const void* data, size_t n) {
        const uint8_t* b = static_cast<const uint8_t*>(data);
        for (size_t i = 0; i < n; ++i) hash = (hash ^ b[i]) * 1099511628211ull;
      };
      for (int with_flush = 0; with_flush < 2; ++with_flush) {
        std::vector<double> t;
        for (int i = 0; i < iters + 5; ++i) {
          const auto t0 = std::chrono::steady_clock::now();
          const Result pr = r->Prepare(p, w.data(), cfgs.data(), sh.b, nullptr, with_flush ? f.data() : nullptr);
          const auto t1 = std::chrono::steady_clock::now();
          if (!pr.ok()) {
            std::fprintf(stderr, "kvq-bench-plan: Prepare: %s\n", pr.message.c_str());
            return 1;
          }
          if (i >= 5) t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
        med[with_flush] = Median(t);
        const std::vector<uint8_t> desc = r->PreparedDescriptors();
        mix(desc.data(), desc.size());
        const CudaStepStats& st = r->stats();
        const int32_t choice[] = {st.num_units,  st.chunk_tokens, st.decode_path, st.ring_stages, st.blocks_per_sm,
                                  st.imma_units, st.mma_full,     st.kivi_mma,    st.kivi_codes,  st.pdl,
                                  st.fused,      st.flush_after,  st.row_class,   st.early_units, st.longest_waiting_unit};
        mix(choice, sizeof(choice));
      }
      std::printf("%-4d %-4d %-4d %-6d %-4d %-8s %10.2f %10.2f %8d  %016llx\n", sh.b, sh.hq, sh.hkv, sh.t, sh.d,
                  PresetName(preset), med[0], med[1], r->stats().num_units, static_cast<unsigned long long>(hash));
      std::fflush(stdout);
    }
  return 0;
}
