// Helpers for the store tests: random activations from fixed seeds and an independent reference
// that runs kvq::LayerCache + kvq::CpuRunStep directly (one sequence at a time, its own arena).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvq/cache.h"
#include "kvq/format.h"
#include "kvq/host_arena.h"
#include "kvq/numeric.h"
#include "kvq/reference.h"

namespace kvq::store::testing {

// `count` random activations (normal, times `scale`, plus per-channel offsets for keys) as raw
// little-endian 2-byte elements of `dtype`.
inline std::string RandomAct(size_t count, std::mt19937_64& rng, kvq::DType dtype, float scale = 1.f,
                             int channels = 0) {
  std::normal_distribution<float> n01(0.f, 1.f);
  std::string out(count * 2, '\0');
  for (size_t i = 0; i < count; ++i) {
    float x = scale * n01(rng);
    if (channels > 0 && (i % channels) % 13 == 5) x *= 6.f;  // outlier channels, as real keys have
    const uint16_t h = kvq::StoreAct(x, dtype);
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

inline uint16_t ActAt(const std::string& s, size_t i) {
  uint16_t h;
  std::memcpy(&h, s.data() + 2 * i, 2);
  return h;
}

inline void SetActAt(std::string* s, size_t i, uint16_t h) { std::memcpy(&(*s)[2 * i], &h, 2); }

// Normalized error of activations `a` against `b` (same size, raw `dt` elements): ||a - b|| / ||b||;
// infinite when either holds a NaN.
inline double NormErr(const std::string& a, const std::string& b, kvq::DType dt) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() / 2; ++i) {
    uint16_t ha, hb;
    std::memcpy(&ha, a.data() + 2 * i, 2);
    std::memcpy(&hb, b.data() + 2 * i, 2);
    const float x = kvq::LoadAct(&ha, dt), y = kvq::LoadAct(&hb, dt);
    if (std::isnan(x) || std::isnan(y)) return INFINITY;
    num += double(x - y) * (x - y);
    den += double(y) * y;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// One session's model shape as the tests use it.
struct TestShape {
  int layers = 2;
  int hq = 4;
  int hkv = 2;
  int d = 64;
  kvq::DType dtype = kvq::DType::kF16;
  kvq::QuantConfig config = kvq::PresetConfig(kvq::Preset::kKivi2);
};

// Independent reference of one session: its own arena, one LayerCache per layer, CpuRunStep on a
// single sequence per call.
class ReferenceSession {
 public:
  explicit ReferenceSession(const TestShape& s) : shape_(s), arena_(int64_t{64} << 20) {
    kvq::CacheShape cs;
    cs.num_kv_heads = s.hkv;
    cs.head_dim = s.d;
    cs.dtype = s.dtype;
    cs.config = s.config;
    for (int l = 0; l < s.layers; ++l) layers_.push_back(std::make_unique<kvq::LayerCache>(cs));
  }
  ~ReferenceSession() {
    for (auto& l : layers_) l->Release(arena_);
  }

  // Runs a step; returns o bytes ([n, Hq, D]) or "" with a test failure.
  std::string Step(int layer, int position, int n, const std::string& q, const std::string& k, const std::string& v) {
    kvq::StepPlan plan;
    kvq::Result r = layers_[layer]->Plan(position, n, arena_, &plan);
    EXPECT_TRUE(r.ok()) << r.message;
    if (!r.ok()) return "";
    plan.work.kv_row = 0;
    plan.work.q_row = 0;
    kvq::StepParams p;
    p.num_q_heads = shape_.hq;
    p.num_kv_heads = shape_.hkv;
    p.head_dim = shape_.d;
    p.dtype = shape_.dtype;
    p.q = q.data();
    p.k_new = k.data();
    p.v_new = v.data();
    std::string o(q.size(), '\0');
    p.o = &o[0];
    r = kvq::CpuRunStep(p, &plan.work, &shape_.config, 1, arena_.data(), 1);
    EXPECT_TRUE(r.ok()) << r.message;
    layers_[layer]->Commit(&plan, arena_);
    return o;
  }
  int length(int layer) const { return layers_[layer]->length(); }
  kvq::CacheBytes bytes(int layer) const { return layers_[layer]->bytes(); }

 private:
  TestShape shape_;
  kvq::HostArena arena_;
  std::vector<std::unique_ptr<kvq::LayerCache>> layers_;
};

// Random q/k/v for one step of one session.
struct StepInput {
  std::string q, k, v;
};

inline StepInput RandomStep(const TestShape& s, int n, std::mt19937_64& rng) {
  StepInput in;
  in.q = RandomAct(size_t(n) * s.hq * s.d, rng, s.dtype);
  in.k = RandomAct(size_t(n) * s.hkv * s.d, rng, s.dtype, 1.f, s.hkv * s.d);
  in.v = RandomAct(size_t(n) * s.hkv * s.d, rng, s.dtype);
  return in;
}

}  // namespace kvq::store::testing
