// kvq-bench-cpu: times one step (flush + append + attention; n = 1 new token per sequence for
// decode, --new N for a prefill chunk ending at T) of one layer through the CPU reference at
// context length T, for every preset.
// The cache is filled with CpuQuantizeAppend (no prefill attention), then the same decode step
// is retried at the same position (truncate + re-run), so every timed step sees exactly T.
//
//   kvq-bench-cpu [--tokens T] [--batch B] [--iters N] [--threads N] [--layers L]
//                 [--shape Hq,Hkv,D]... [--preset NAME]...
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvq/cache.h"
#include "kvq/format.h"
#include "kvq/host_arena.h"
#include "kvq/numeric.h"
#include "kvq/reference.h"

namespace {

struct Shape {
  int hq, hkv, d;
};

struct Options {
  int tokens = 4096;
  int batch = 1;
  int iters = 20;
  int threads = 0;
  int layers = 30;  // for the per-token figure of a whole model
  int n = 1;        // new tokens per sequence per step (> 1: a prefill chunk ending at T)
  std::vector<Shape> shapes;
  std::vector<kvq::Preset> presets;
};

std::vector<uint16_t> Random(size_t n, std::mt19937_64& rng, float scale) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = kvq::FloatToHalfBits(d(rng));
  return v;
}

struct Timing {
  double median_us = -1, best_us = -1;
};

// Microseconds per decode step of one layer (batch sequences); median_us < 0 on error.
Timing Bench(const Options& opt, const Shape& sh, kvq::Preset preset) {
  kvq::CacheShape cs;
  cs.num_kv_heads = sh.hkv;
  cs.head_dim = sh.d;
  cs.dtype = kvq::DType::kF16;
  cs.config = kvq::PresetConfig(preset);
  const int64_t per_seq = (int64_t(opt.tokens) + 512) * sh.hkv * sh.d * 2 * 2 * 2;
  kvq::HostArena arena(per_seq * opt.batch + (int64_t(64) << 20));
  std::vector<std::unique_ptr<kvq::LayerCache>> caches;
  for (int b = 0; b < opt.batch; ++b) caches.push_back(std::make_unique<kvq::LayerCache>(cs));
  std::mt19937_64 rng(7);
  const int chunk = 512;
  kvq::StepParams p;
  p.num_q_heads = sh.hq;
  p.num_kv_heads = sh.hkv;
  p.head_dim = sh.d;
  p.dtype = kvq::DType::kF16;
  // Fill to T - 1 tokens: quantize-append only.
  for (int b = 0; b < opt.batch; ++b) {
    for (int pos = 0; pos < opt.tokens - opt.n;) {
      const int n = std::min(chunk, opt.tokens - opt.n - pos);
      const auto k = Random(size_t(n) * sh.hkv * sh.d, rng, 2.f);
      const auto v = Random(size_t(n) * sh.hkv * sh.d, rng, 1.f);
      kvq::StepPlan plan;
      kvq::Result r = caches[size_t(b)]->Plan(pos, n, arena, &plan);
      if (!r.ok()) {
        std::fprintf(stderr, "plan: %s\n", r.message.c_str());
        return Timing{};
      }
      p.k_new = k.data();
      p.v_new = v.data();
      p.q = k.data();  // unused by quantize-append
      p.o = nullptr;
      std::vector<uint16_t> dummy(size_t(n) * sh.hq * sh.d);
      p.q = dummy.data();
      p.o = dummy.data();
      r = kvq::CpuQuantizeAppend(p, &plan.work, &cs.config, 1, arena.data(), opt.threads);
      if (!r.ok()) {
        std::fprintf(stderr, "fill: %s\n", r.message.c_str());
        return Timing{};
      }
      caches[size_t(b)]->Commit(&plan, arena);
      pos += n;
    }
  }
  // The step: n new tokens per sequence at position T - n (so the last query sees T tokens).
  const size_t rows = size_t(opt.batch) * opt.n;
  const auto q = Random(rows * sh.hq * sh.d, rng, 1.f);
  const auto k = Random(rows * sh.hkv * sh.d, rng, 2.f);
  const auto v = Random(rows * sh.hkv * sh.d, rng, 1.f);
  std::vector<uint16_t> o(q.size());
  p.q = q.data();
  p.k_new = k.data();
  p.v_new = v.data();
  p.o = o.data();
  std::vector<double> times;
  for (int it = 0; it < opt.iters + 2; ++it) {
    std::vector<kvq::StepPlan> plans(size_t(opt.batch));
    std::vector<kvq::SeqWork> works;
    std::vector<kvq::QuantConfig> cfgs(size_t(opt.batch), cs.config);
    const auto t0 = std::chrono::steady_clock::now();
    for (int b = 0; b < opt.batch; ++b) {
      kvq::Result r = caches[size_t(b)]->Plan(opt.tokens - opt.n, opt.n, arena, &plans[size_t(b)]);
      if (!r.ok()) {
        std::fprintf(stderr, "plan: %s\n", r.message.c_str());
        return Timing{};
      }
      plans[size_t(b)].work.kv_row = int64_t(b) * opt.n;
      plans[size_t(b)].work.q_row = int64_t(b) * opt.n;
      works.push_back(plans[size_t(b)].work);
    }
    const kvq::Result r = kvq::CpuRunStep(p, works.data(), cfgs.data(), opt.batch, arena.data(), opt.threads);
    if (!r.ok()) {
      std::fprintf(stderr, "step: %s\n", r.message.c_str());
      return Timing{};
    }
    for (int b = 0; b < opt.batch; ++b) caches[size_t(b)]->Commit(&plans[size_t(b)], arena);
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (it >= 2) times.push_back(us);  // two warm-up steps (the first applies the fill's pending flush)
  }
  for (auto& c : caches) c->Release(arena);
  std::sort(times.begin(), times.end());
  Timing t;
  t.median_us = times[times.size() / 2];
  t.best_us = times.front();
  return t;
}

bool ParseShape(const char* s, Shape* out) {
  return std::sscanf(s, "%d,%d,%d", &out->hq, &out->hkv, &out->d) == 3 && out->hkv > 0 && out->hq % out->hkv == 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const bool has = i + 1 < argc;
    if (!std::strcmp(argv[i], "--tokens") && has) opt.tokens = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--batch") && has) opt.batch = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--iters") && has) opt.iters = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--threads") && has) opt.threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--layers") && has) opt.layers = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--new") && has) opt.n = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--preset") && has) {
      kvq::Preset pr;
      if (!kvq::ParsePreset(argv[++i], &pr)) {
        std::fprintf(stderr, "kvq-bench-cpu: unknown preset %s\n", argv[i]);
        return 2;
      }
      opt.presets.push_back(pr);
    } else if (!std::strcmp(argv[i], "--shape") && has) {
      Shape s;
      if (!ParseShape(argv[++i], &s)) {
        std::fprintf(stderr, "kvq-bench-cpu: bad --shape %s (want Hq,Hkv,D)\n", argv[i]);
        return 2;
      }
      opt.shapes.push_back(s);
    } else {
      std::fprintf(stderr,
                   "usage: kvq-bench-cpu [--tokens T] [--new N] [--batch B] [--iters N] [--threads N] [--layers L] "
                   "[--shape Hq,Hkv,D]... [--preset NAME]...\n");
      return 2;
    }
  }
  if (opt.tokens < 2 || opt.n < 1 || opt.n >= opt.tokens || opt.batch < 1 || opt.iters < 1 || opt.layers < 1) {
    std::fprintf(stderr, "kvq-bench-cpu: --tokens >= 2, 1 <= --new < --tokens, --batch, --iters, --layers >= 1\n");
    return 2;
  }
  if (opt.shapes.empty()) opt.shapes = {{32, 8, 128}, {9, 3, 64}};
  if (opt.presets.empty())
    opt.presets = {kvq::Preset::kFp16, kvq::Preset::kKivi2, kvq::Preset::kKivi4, kvq::Preset::kInnerQ,
                   kvq::Preset::kInnerQ2, kvq::Preset::kInnerQBase};
  std::printf("kvq-bench-cpu: step (flush + append + attention) of one layer, T=%d, %d new token(s) per sequence, "
              "batch=%d, fp16, threads=%d (0 = all), median of %d steps\n",
              opt.tokens, opt.n, opt.batch, opt.threads, opt.iters);
  std::printf("%-14s %-12s %12s %12s %14s %16s\n", "shape", "preset", "us/step", "best_us", "KV tok/s",
              "model tok/s");
  for (const Shape& sh : opt.shapes) {
    for (kvq::Preset pr : opt.presets) {
      const Timing tm = Bench(opt, sh, pr);
      if (tm.median_us < 0) return 1;
      const double us = tm.median_us;
      char name[32];
      std::snprintf(name, sizeof name, "%d/%d/%d", sh.hq, sh.hkv, sh.d);
      // KV tok/s: cached tokens attended per second (T x batch per step); model tok/s: decode
      // tokens per second of a model with --layers such layers, attention only.
      std::printf("%-14s %-12s %12.1f %12.1f %14.3g %16.1f\n", name, kvq::PresetName(pr), us, tm.best_us,
                  double(opt.tokens) * opt.batch / (us * 1e-6), double(opt.batch) * opt.n / (us * 1e-6 * opt.layers));
    }
  }
  std::printf("us/step: median, one layer, all sequences of the batch; KV tok/s = T x batch / step;\n"
              "model tok/s = batch x new / (%d layers x step), attention only.\n",
              opt.layers);
  return 0;
}
