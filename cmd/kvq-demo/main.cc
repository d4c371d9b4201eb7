// kvq-demo: quantizes one layer's KV cache with every preset through the CPU reference, prints the
// bytes it takes against fp16 and the attention error against the fp16 preset.
//
//   kvq-demo [--tokens N] [--decode N]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvq/cache.h"
#include "kvq/format.h"
#include "kvq/host_arena.h"
#include "kvq/numeric.h"
#include "kvq/reference.h"

namespace {

constexpr int kHq = 9, kHkv = 3, kD = 64;  // one layer of SmolLM2-135M

struct Inputs {
  std::vector<uint16_t> q, k, v;  // [T, H, D] fp16 bits
};

// Keys with per-channel scales and offsets (outlier channels, as real post-RoPE keys have).
Inputs MakeInputs(int tokens, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<float> ch_scale(kHkv * kD), ch_bias(kHkv * kD);
  for (int i = 0; i < kHkv * kD; ++i) {
    ch_scale[i] = (i % 17 == 3) ? 8.f : 0.5f + std::fabs(n01(rng));
    ch_bias[i] = 0.5f * n01(rng);
  }
  Inputs in;
  in.q.resize(size_t(tokens) * kHq * kD);
  in.k.resize(size_t(tokens) * kHkv * kD);
  in.v.resize(size_t(tokens) * kHkv * kD);
  for (auto& x : in.q) x = kvq::FloatToHalfBits(n01(rng));
  for (size_t i = 0; i < in.k.size(); ++i) {
    const size_t c = i % (kHkv * kD);
    in.k[i] = kvq::FloatToHalfBits(ch_scale[c] * n01(rng) + ch_bias[c]);
    in.v[i] = kvq::FloatToHalfBits(n01(rng));
  }
  return in;
}

struct RunResult {
  std::vector<float> decode_out;  // outputs of the decode steps
  kvq::CacheBytes bytes;
  double seconds = 0;
  bool ok = false;
  std::string error;
};

RunResult Run(kvq::Preset preset, const Inputs& in, int prefill, int decode) {
  RunResult r;
  kvq::CacheShape shape;
  shape.num_kv_heads = kHkv;
  shape.head_dim = kD;
  shape.dtype = kvq::DType::kF16;
  shape.config = kvq::PresetConfig(preset);
  kvq::HostArena arena(int64_t{256} << 20);
  kvq::LayerCache cache(shape);
  std::vector<uint16_t> out;
  const auto t0 = std::chrono::steady_clock::now();
  int pos = 0;
  const int chunk = 512;
  while (pos < prefill + decode) {
    const int n = pos < prefill ? std::min(chunk, prefill - pos) : 1;
    kvq::StepPlan plan;
    kvq::Result res = cache.Plan(pos, n, arena, &plan);
    if (!res.ok()) {
      r.error = res.message;
      return r;
    }
    plan.work.kv_row = 0;
    plan.work.q_row = 0;
    kvq::StepParams p;
    p.num_q_heads = kHq;
    p.num_kv_heads = kHkv;
    p.head_dim = kD;
    p.dtype = kvq::DType::kF16;
    p.q = in.q.data() + size_t(pos) * kHq * kD;
    p.k_new = in.k.data() + size_t(pos) * kHkv * kD;
    p.v_new = in.v.data() + size_t(pos) * kHkv * kD;
    out.assign(size_t(n) * kHq * kD, 0);
    p.o = out.data();
    res = kvq::CpuRunStep(p, &plan.work, &shape.config, 1, arena.data());
    if (!res.ok()) {
      kvq::LayerCache::Abort(&plan, arena);
      r.error = res.message;
      return r;
    }
    cache.Commit(&plan, arena);
    if (pos >= prefill)
      for (uint16_t h : out) r.decode_out.push_back(kvq::HalfBitsToFloat(h));
    pos += n;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.bytes = cache.bytes();
  cache.Release(arena);
  r.ok = true;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int tokens = 4096, decode = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tokens")) tokens = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--decode")) decode = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: kvq-demo [--tokens N] [--decode N]\n");
      return 2;
    }
  }
  if (tokens < 1 || decode < 1) {
    std::fprintf(stderr, "kvq-demo: --tokens and --decode must be >= 1\n");
    return 2;
  }
  const Inputs in = MakeInputs(tokens + decode, 42);
  const int total = tokens + decode;
  const double fp16_bytes = double(total) * kHkv * kD * 2 /*K,V*/ * 2 /*bytes*/;
  std::printf("kvq-demo: one layer (Hq=%d, Hkv=%d, D=%d, fp16), %d prefill tokens + %d decode steps\n",
              kHq, kHkv, kD, tokens, decode);
  std::printf("%-12s %12s %10s %9s %8s %12s %10s\n", "preset", "stored_B", "fp16_B", "saved", "bits/el",
              "decode_err", "time_s");
  RunResult base = Run(kvq::Preset::kFp16, in, tokens, decode);
  if (!base.ok) {
    std::fprintf(stderr, "kvq-demo: fp16 run failed: %s\n", base.error.c_str());
    return 1;
  }
  for (kvq::Preset p : {kvq::Preset::kFp16, kvq::Preset::kKivi2, kvq::Preset::kKivi4, kvq::Preset::kInnerQ,
                        kvq::Preset::kInnerQ2, kvq::Preset::kInnerQBase}) {
    RunResult r = p == kvq::Preset::kFp16 ? base : Run(p, in, tokens, decode);
    if (!r.ok) {
      std::fprintf(stderr, "kvq-demo: %s failed: %s\n", kvq::PresetName(p), r.error.c_str());
      return 1;
    }
    double num = 0, den = 0;
    for (size_t i = 0; i < r.decode_out.size(); ++i) {
      const double d = r.decode_out[i] - base.decode_out[i];
      num += d * d;
      den += double(base.decode_out[i]) * base.decode_out[i];
    }
    const double stored = double(r.bytes.total());
    std::printf("%-12s %12.0f %10.0f %8.1f%% %8.2f %12.2e %10.2f\n", kvq::PresetName(p), stored, fp16_bytes,
                100.0 * (1.0 - stored / fp16_bytes), stored * 8.0 / (double(total) * kHkv * kD * 2),
                std::sqrt(num / std::max(den, 1e-30)), r.seconds);
  }
  std::printf("stored_B counts whole pages (codes, scales, zeros, sink, window, key-norm factors);\n"
              "decode_err = ||o - o_fp16|| / ||o_fp16|| over the decode steps' attention outputs.\n");
  return 0;
}
