// Test helpers for the CPU reference: random activations, sessions over a guarded HostArena, a
// test-owned dequantizer that reads the stored layout by the format's rules (format.h), and exact
// attention in double precision.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvq/cache.h"
#include "kvq/format.h"
#include "kvq/host_arena.h"
#include "kvq/numeric.h"
#include "kvq/quant.h"
#include "kvq/reference.h"

namespace kvq {
namespace testing {

struct Model {
  int hq = 4, hkv = 2, d = 64;
  DType dtype = DType::kF16;
};

// Activations of n tokens: q [n, Hq, D], k/v [n, Hkv, D] as activation bits. Keys get per-channel
// scales and offsets (outlier channels), as real post-RoPE keys have.
struct Tokens {
  std::vector<uint16_t> q, k, v;
};

inline Tokens RandomTokens(const Model& m, int n, std::mt19937_64& rng) {
  std::normal_distribution<float> n01(0.f, 1.f);
  Tokens t;
  t.q.resize(size_t(n) * m.hq * m.d);
  t.k.resize(size_t(n) * m.hkv * m.d);
  t.v.resize(size_t(n) * m.hkv * m.d);
  for (auto& x : t.q) x = StoreAct(n01(rng), m.dtype);
  for (size_t i = 0; i < t.k.size(); ++i) {
    const int c = int(i % size_t(m.d));
    const float sc = (c % 13 == 5) ? 6.f : 1.f + 0.05f * float(c % 7);
    const float off = 0.3f * float((c % 5) - 2);
    t.k[i] = StoreAct(sc * n01(rng) + off, m.dtype);
    t.v[i] = StoreAct(n01(rng), m.dtype);
  }
  return t;
}

// One session's cache plus the history of the k/v it was given (to check stored content).
struct Seq {
  Seq(const Model& m, const QuantConfig& cfg) : model(m) {
    shape.num_kv_heads = m.hkv;
    shape.head_dim = m.d;
    shape.dtype = m.dtype;
    shape.config = cfg;
    cache = std::make_unique<LayerCache>(shape);
  }
  Model model;
  CacheShape shape;
  std::unique_ptr<LayerCache> cache;
  std::vector<uint16_t> k_hist, v_hist;  // [pos][Hkv][D]
};

struct StepIn {
  Seq* seq;
  int32_t position;
  const Tokens* tokens;
};

// Runs one batched step over `ins` (all sequences share the model). Outputs o [rows, Hq, D] in
// input order. Checks the arena's guard bands after the step.
// flush_after: each sequence's next flush runs right after the attention (LayerCache::
// PlanFlushAfter, a flush-only CpuQuantizeAppend, CommitFlushAfter), as the store does with it on.
inline Result RunBatch(HostArena& arena, const std::vector<StepIn>& ins, std::vector<uint16_t>* o,
                       float softmax_scale = 0.f, int threads = 0, bool flush_after = false) {
  const Model& m = ins.at(0).seq->model;
  std::vector<StepPlan> plans(ins.size());
  std::vector<SeqWork> works;
  std::vector<QuantConfig> cfgs;
  std::vector<uint16_t> q, k, v;
  int64_t rows = 0;
  for (size_t i = 0; i < ins.size(); ++i) {
    const int n = int(ins[i].tokens->k.size() / size_t(m.hkv * m.d));
    Result r = ins[i].seq->cache->Plan(ins[i].position, n, arena, &plans[i]);
    if (!r.ok()) {
      for (size_t j = 0; j < i; ++j) LayerCache::Abort(&plans[j], arena);
      return r;
    }
    plans[i].work.kv_row = rows;
    plans[i].work.q_row = rows;
    rows += n;
    q.insert(q.end(), ins[i].tokens->q.begin(), ins[i].tokens->q.end());
    k.insert(k.end(), ins[i].tokens->k.begin(), ins[i].tokens->k.end());
    v.insert(v.end(), ins[i].tokens->v.begin(), ins[i].tokens->v.end());
  }
  for (size_t i = 0; i < ins.size(); ++i) {
    works.push_back(plans[i].work);
    cfgs.push_back(ins[i].seq->shape.config);
  }
  StepParams p;
  p.num_q_heads = m.hq;
  p.num_kv_heads = m.hkv;
  p.head_dim = m.d;
  p.dtype = m.dtype;
  p.softmax_scale = softmax_scale;
  p.q = q.data();
  p.k_new = k.data();
  p.v_new = v.data();
  o->assign(size_t(rows) * m.hq * m.d, 0x7e00);
  p.o = o->data();
  Result r = CpuRunStep(p, works.data(), cfgs.data(), int(ins.size()), arena.data(), threads);
  std::vector<StepPlan> flushes(flush_after ? ins.size() : 0);
  std::vector<bool> flush_planned(flushes.size(), false);
  if (r.ok() && flush_after) {
    std::vector<SeqWork> fw;
    for (size_t i = 0; i < ins.size(); ++i) {
      flush_planned[i] = ins[i].seq->cache->PlanFlushAfter(plans[i], arena, &flushes[i]).ok();
      fw.push_back(flushes[i].work);  // no flush where it could not be planned
    }
    r = CpuQuantizeAppend(p, fw.data(), cfgs.data(), int(ins.size()), arena.data(), threads);
    if (!r.ok())
      for (auto& f : flushes) LayerCache::Abort(&f, arena);
  }
  if (!r.ok()) {
    for (auto& pl : plans) LayerCache::Abort(&pl, arena);
    return r;
  }
  for (size_t i = 0; i < ins.size(); ++i) {
    Seq& s = *ins[i].seq;
    s.cache->Commit(&plans[i], arena);
    if (flush_after && flush_planned[i]) s.cache->CommitFlushAfter(&flushes[i]);
    const size_t row = size_t(m.hkv) * m.d;
    s.k_hist.resize(size_t(ins[i].position) * row);
    s.v_hist.resize(size_t(ins[i].position) * row);
    s.k_hist.insert(s.k_hist.end(), ins[i].tokens->k.begin(), ins[i].tokens->k.end());
    s.v_hist.insert(s.v_hist.end(), ins[i].tokens->v.begin(), ins[i].tokens->v.end());
  }
  const std::string guard = arena.Check();
  if (!guard.empty()) return Result::Error(Code::kInternal, guard);
  return Result::Ok();
}

inline Result RunOne(HostArena& arena, Seq& s, int32_t position, const Tokens& t, std::vector<uint16_t>* o,
                     float softmax_scale = 0.f, int threads = 0, bool flush_after = false) {
  return RunBatch(arena, {StepIn{&s, position, &t}}, o, softmax_scale, threads, flush_after);
}

// The cache as the test reads it from the stored layout: K^, V^ [Hkv][T][D] in double (body keys
// multiplied back by the key-norm factors), the segment of every token, and for body elements a
// bound on |x^ - x| from the group's stored scale and zero.
struct Dequant {
  int T = 0;
  std::vector<double> k, v, k_bound, v_bound;
  std::vector<int> k_seg, v_seg;  // 0 sink, 1 body, 2 window
};

inline Dequant DequantizeCache(const LayerCache& c, const uint8_t* arena) {
  const CacheShape& sh = c.shape();
  const int hkv = sh.num_kv_heads, d = sh.head_dim;
  Dequant out;
  out.T = c.length();
  const size_t n = size_t(hkv) * out.T * d;
  out.k.assign(n, 0);
  out.v.assign(n, 0);
  out.k_bound.assign(n, 0);
  out.v_bound.assign(n, 0);
  out.k_seg.assign(size_t(out.T), -1);
  out.v_seg.assign(size_t(out.T), -1);
  const float* norm = nullptr;
  if (sh.config.key_norm && c.norm_ready()) norm = reinterpret_cast<const float*>(arena + c.norm_offset());
  for (int which = 0; which < 2; ++which) {
    const StreamState& s = which == 0 ? c.k() : c.v();
    const TensorFormat& f = which == 0 ? sh.config.k : sh.config.v;
    const StreamLayout l = MakeStreamLayout(f, hkv, d);
    std::vector<double>& dst = which == 0 ? out.k : out.v;
    std::vector<double>& bnd = which == 0 ? out.k_bound : out.v_bound;
    std::vector<int>& seg = which == 0 ? out.k_seg : out.v_seg;
    for (int t = 0; t < out.T; ++t) {
      for (int h = 0; h < hkv; ++h) {
        double* x = &dst[(size_t(h) * out.T + t) * d];
        double* b = &bnd[(size_t(h) * out.T + t) * d];
        const uint16_t* fp = nullptr;
        if (t < c.sink_len()) {
          seg[size_t(t)] = 0;
          fp = reinterpret_cast<const uint16_t*>(arena + s.sink_page + (int64_t(h) * kPageTokens + t) * d * 2);
        } else if (t - c.sink_len() < s.body_len) {
          seg[size_t(t)] = 1;
          const int bi = t - c.sink_len();
          const int slot = bi % kPageTokens;
          const uint8_t* head = arena + s.body_pages[size_t(bi / kPageTokens)] + int64_t(h) * l.head_bytes;
          for (int ch = 0; ch < d; ++ch) {
            int g, i;
            if (f.grouping == Grouping::kAlongChannels) {
              g = slot * (d / f.group_size) + ch / f.group_size;
              i = ch % f.group_size;
            } else {
              g = (slot / f.group_size) * d + ch;
              i = slot % f.group_size;
            }
            const uint32_t* words = reinterpret_cast<const uint32_t*>(head) + int64_t(g) * l.words_per_group;
            uint16_t sc, zr = 0;
            std::memcpy(&sc, head + l.scales_offset + 2 * g, 2);
            if (f.has_zeros()) std::memcpy(&zr, head + l.zeros_offset + 2 * g, 2);
            // The test's own reading of the format: code i at stream bits i*b .. i*b+b-1 (LSB
            // first, stream bit k = bit k%32 of word k/32); asym x^ = c*s + z (hybrid: scale sign
            // bit set), sym x^ = (c - L)*s.
            uint32_t code = 0;
            for (int bit = 0; bit < f.bits; ++bit) {
              const int k = i * f.bits + bit;
              code |= ((words[k / 32] >> (k % 32)) & 1u) << bit;
            }
            const bool asym = f.mode == QuantMode::kAsym || (f.mode == QuantMode::kHybrid && (sc & 0x8000));
            const double s_abs = double(HalfBitsToFloat(uint16_t(sc & 0x7fff)));
            const double xq = asym ? code * s_abs + double(HalfBitsToFloat(zr))
                                   : (double(code) - ((1 << (f.bits - 1)) - 1)) * s_abs;
            const double fac = (which == 0 && norm) ? double(norm[h * d + ch]) : 1.0;
            x[ch] = xq * fac;
            const double s16 = double(HalfBitsToFloat(uint16_t(sc & 0x7fff)));
            const double z16 = std::fabs(double(HalfBitsToFloat(zr)));
            const int levels = (1 << f.bits) - 1;
            // s/2 + the fp16 rounding of s (times the largest code) and of the zero.
            b[ch] = fac * (s16 * (0.5 + levels * std::ldexp(1.0, -10)) + z16 * std::ldexp(1.0, -10) + 1e-7);
          }
          continue;
        } else {
          seg[size_t(t)] = 2;
          const int64_t idx = int64_t(s.win_first) + (t - c.sink_len() - s.body_len);
          fp = reinterpret_cast<const uint16_t*>(arena + s.win_pages[size_t(idx / kPageTokens)] +
                                                 (int64_t(h) * kPageTokens + idx % kPageTokens) * d * 2);
        }
        for (int ch = 0; ch < d; ++ch) x[ch] = double(LoadAct(fp + ch, sh.dtype));
      }
    }
  }
  return out;
}

// Checks the dequantized cache against the history: sink and window tokens bit-exact, body
// tokens within the per-element bound.
inline void ExpectCacheMatchesHistory(const Seq& s, const Dequant& dq) {
  const int hkv = s.model.hkv, d = s.model.d;
  ASSERT_EQ(size_t(dq.T) * hkv * d, s.k_hist.size());
  int bad = 0;
  for (int which = 0; which < 2; ++which) {
    const std::vector<uint16_t>& hist = which == 0 ? s.k_hist : s.v_hist;
    const std::vector<double>& x = which == 0 ? dq.k : dq.v;
    const std::vector<double>& b = which == 0 ? dq.k_bound : dq.v_bound;
    const std::vector<int>& seg = which == 0 ? dq.k_seg : dq.v_seg;
    for (int t = 0; t < dq.T; ++t)
      for (int h = 0; h < hkv; ++h)
        for (int c = 0; c < d; ++c) {
          const double want = LoadAct(&hist[(size_t(t) * hkv + h) * d + c], s.model.dtype);
          const size_t i = (size_t(h) * dq.T + t) * d + c;
          const double err = std::fabs(x[i] - want);
          const bool ok = seg[size_t(t)] == 1 ? err <= b[i] : err == 0.0;
          if (!ok && bad++ < 5)
            ADD_FAILURE() << (which ? "V" : "K") << " token " << t << " head " << h << " ch " << c << " seg "
                          << seg[size_t(t)] << ": stored " << x[i] << " input " << want << " bound " << b[i];
        }
  }
  EXPECT_EQ(bad, 0);
}

// Exact attention in double over the dequantized cache for the last n query tokens (their q in
// `q` [n, Hq, D]); returns [n, Hq, D].
inline std::vector<double> ExactAttention(const Model& m, const Dequant& dq, const std::vector<uint16_t>& q, int n,
                                          float softmax_scale = 0.f, int first_row = 0) {
  const int g = m.hq / m.hkv;
  const double scale = softmax_scale > 0 ? double(softmax_scale) : 1.0 / std::sqrt(double(m.d));
  std::vector<double> o(size_t(n - first_row) * m.hq * m.d, 0.0);
  std::vector<double> sc(static_cast<size_t>(dq.T));
  for (int i = first_row; i < n; ++i) {
    const int pos = dq.T - n + i;
    for (int hh = 0; hh < m.hq; ++hh) {
      const int h = hh / g;
      const uint16_t* qr = &q[(size_t(i) * m.hq + hh) * m.d];
      double mx = -1e300;
      for (int t = 0; t <= pos; ++t) {
        const double* kr = &dq.k[(size_t(h) * dq.T + t) * m.d];
        double s = 0;
        for (int c = 0; c < m.d; ++c) s += double(LoadAct(qr + c, m.dtype)) * kr[c];
        sc[size_t(t)] = s * scale;
        mx = std::max(mx, sc[size_t(t)]);
      }
      double den = 0;
      for (int t = 0; t <= pos; ++t) den += std::exp(sc[size_t(t)] - mx);
      double* orow = &o[(size_t(i - first_row) * m.hq + hh) * m.d];
      for (int t = 0; t <= pos; ++t) {
        const double p = std::exp(sc[size_t(t)] - mx) / den;
        const double* vr = &dq.v[(size_t(h) * dq.T + t) * m.d];
        for (int c = 0; c < m.d; ++c) orow[c] += p * vr[c];
      }
    }
  }
  return o;
}

// ||o - ref|| / ||ref|| over rows [first_row, n) of o; NaN in o gives +inf.
inline double NormalizedError(const Model& m, const std::vector<uint16_t>& o, const std::vector<double>& ref,
                              int first_row = 0) {
  double num = 0, den = 0;
  const size_t off = size_t(first_row) * m.hq * m.d;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double x = LoadAct(&o[off + i], m.dtype);
    if (!std::isfinite(x)) return INFINITY;
    num += (x - ref[i]) * (x - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Tolerance of the attention comparison (normalized error over a step's outputs). The output's
// rounding to the activation dtype dominates: its RMS is about 2^-11/sqrt(3) = 2.8e-4 for fp16
// and 2^-8/sqrt(3) = 2.3e-3 for bf16; observed maxima over the preset suite were 2.5e-4 and
// 2.1e-3. A real error in the kernels (one wrong token, a wrong scale) is far above these.
inline double AttnTol(DType dt) { return dt == DType::kF16 ? 6e-4 : 4e-3; }

inline std::vector<Preset> AllPresets() {
  return {Preset::kFp16, Preset::kKivi2, Preset::kKivi4, Preset::kInnerQ, Preset::kInnerQ2, Preset::kInnerQBase};
}

}  // namespace testing
}  // namespace kvq
