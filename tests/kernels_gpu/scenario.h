// Test and benchmark scenarios for the CUDA kernels: a host arena of pages with guard bands, a
// tiny planner that applies the window policy (QUANT_FORMATS.md) and produces SeqWork for a
// batch, and random contents. Host code only; shared by kernels_gpu_test and kvq-bench.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kvq/cache.h"
#include "kvq/format.h"
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>

namespace kvq {
namespace testing {

// True when a CUDA device is usable; clears the error a machine without a driver leaves behind.
inline bool HaveCudaDevice() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

constexpr uint8_t kFill = 0xFF;   // never-written bytes: fp16/bf16 NaN if a kernel reads them
constexpr uint8_t kGuard = 0xA5;  // guard bands between pages
constexpr int64_t kGuardBytes = 64;

// A host arena of pages, each surrounded by guard bands.
// A virtual arena (materialize = false) only hands out offsets: the benchmark keeps its arena on
// the device alone.
class Arena {
 public:
  explicit Arena(bool materialize = true) : materialize_(materialize) { AddGuard(); }
  int64_t Alloc(int64_t n) {
    const int64_t off = size_;
    size_ += AlignUp16(n);
    if (materialize_) bytes_.resize(size_, kFill);
    AddGuard();
    return off;
  }
  bool materialized() const { return materialize_; }
  int64_t size() const { return size_; }
  std::vector<uint8_t>& bytes() { return bytes_; }
  const std::vector<uint8_t>& bytes() const { return bytes_; }
  // Offset of the first guard byte that changed in `data` (a copy of this arena), -1 if none.
  int64_t FirstBrokenGuard(const uint8_t* data) const {
    for (const auto& g : guards_)
      for (int64_t i = 0; i < kGuardBytes; ++i)
        if (data[g + i] != kGuard) return g + i;
    return -1;
  }

 private:
  void AddGuard() {
    guards_.push_back(size_);
    size_ += kGuardBytes;
    if (materialize_) bytes_.resize(size_, kGuard);
  }
  bool materialize_;
  int64_t size_ = 0;
  std::vector<uint8_t> bytes_;
  std::vector<int64_t> guards_;
};

struct TStream {
  int body_len = 0, win_len = 0, win_first = 0;
  std::vector<int64_t> body, win;
  int64_t sink = -1;
};

struct TSeq {
  QuantConfig cfg;
  int sink_len = 0;
  TStream k, v;
  bool norm_ready = false;
  int64_t norm = -1;
  int length() const { return sink_len + k.body_len + k.win_len; }
};

// Work of one sequence for one step; owns the page arrays the SeqWork points into.
struct TStep {
  SeqWork w;
  std::vector<int64_t> kb, kw, vb, vw;
  TSeq next;
  void Point() {
    w.k.body_pages = kb.data();
    w.k.win_pages = kw.data();
    w.v.body_pages = vb.data();
    w.v.win_pages = vw.data();
  }
};

inline int FlushCount(const TensorFormat& f, int win_len) {
  if (!f.quantized() || win_len < f.keep + f.flush) return 0;
  return (win_len - f.keep) / f.flush * f.flush;
}

inline uint16_t ToAct(float x, DType dt) {
  if (dt == DType::kBF16) return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  return __half_as_ushort(__float2half_rn(x));
}
inline float FromAct(uint16_t b, DType dt) {
  if (dt == DType::kBF16) {
    const uint32_t u = uint32_t{b} << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return __half2float(__ushort_as_half(b));
}

// Fills token slot `slot` of a full-precision page with random activations (all KV heads).
inline void FillToken(Arena& a, int64_t page, int slot, int hkv, int d, DType dt, std::mt19937& rng,
                      float outlier_scale) {
  if (!a.materialized()) return;
  std::normal_distribution<float> nd(0.f, 1.f);
  // head-major page: [Hkv][kPageTokens][D]
  uint16_t* p = reinterpret_cast<uint16_t*>(a.bytes().data() + page) + int64_t{slot} * d;
  for (int h = 0; h < hkv; ++h)
    for (int c = 0; c < d; ++c) {
      // A few outlier channels, as keys have after RoPE.
      const float s = (c % 16 == 3) ? outlier_scale : 1.f;
      p[int64_t{h} * kPageTokens * d + c] = ToAct(nd(rng) * s, dt);
    }
}

// A sequence with L0 tokens: sink filled first, the rest in the full-precision window starting
// at slot `win_first`. Nothing quantized yet: the first step's flush quantizes the old tokens.
inline TSeq MakeSeq(Arena& a, const QuantConfig& cfg, int hkv, int d, DType dt, int L0,
                    int win_first, std::mt19937& rng) {
  TSeq s;
  s.cfg = cfg;
  const int64_t fp = int64_t{kPageTokens} * hkv * d * 2;
  if (cfg.sink > 0) {
    s.k.sink = a.Alloc(fp);
    s.v.sink = a.Alloc(fp);
  }
  if (cfg.key_norm) s.norm = a.Alloc(int64_t{hkv} * d * 4);
  s.sink_len = std::min(cfg.sink, L0);
  for (int t = 0; t < s.sink_len; ++t) {
    FillToken(a, s.k.sink, t, hkv, d, dt, rng, 8.f);
    FillToken(a, s.v.sink, t, hkv, d, dt, rng, 1.f);
  }
  const int w = L0 - s.sink_len;
  for (TStream* st : {&s.k, &s.v}) {
    st->win_first = w > 0 ? win_first : 0;
    st->win_len = w;
    const int pages = (st->win_first + w + kPageTokens - 1) / kPageTokens;
    for (int i = 0; i < pages; ++i) st->win.push_back(a.Alloc(fp));
    for (int t = 0; t < w; ++t) {
      const int slot = st->win_first + t;
      FillToken(a, st->win[slot / kPageTokens], slot % kPageTokens, hkv, d, dt, rng,
                st == &s.k ? 8.f : 1.f);
    }
  }
  return s;
}

// Plans one step appending n tokens: the window policy, page allocation and the next state.
inline TStep PlanStep(Arena& a, const TSeq& s, int hkv, int d, int n, int64_t kv_row, int64_t q_row) {
  TStep st;
  st.next = s;
  const QuantConfig& c = s.cfg;
  const int to_sink = std::max(0, std::min(n, c.sink - s.sink_len));
  const int to_win = n - to_sink;
  const int fk = FlushCount(c.k, s.k.win_len);
  const int fv = FlushCount(c.v, s.v.win_len);
  auto plan_stream = [&](const TStream& in, const TensorFormat& f, int flush, TStream* out,
                         StreamView* view, std::vector<int64_t>* body, std::vector<int64_t>* win) {
    const StreamLayout l = MakeStreamLayout(f, hkv, d);
    *out = in;
    const int body_pages = (in.body_len + flush + kPageTokens - 1) / kPageTokens;
    while (static_cast<int>(out->body.size()) < body_pages) out->body.push_back(a.Alloc(l.quant_page_bytes));
    const int win_pages = (in.win_first + in.win_len + to_win + kPageTokens - 1) / kPageTokens;
    while (static_cast<int>(out->win.size()) < win_pages) out->win.push_back(a.Alloc(l.fp_page_bytes));
    *body = out->body;
    *win = out->win;
    view->body_len = in.body_len;
    view->win_len = in.win_len;
    view->win_first = in.win_first;
    view->num_body_pages = static_cast<int32_t>(body->size());
    view->num_win_pages = static_cast<int32_t>(win->size());
    view->sink_page = in.sink;
    out->body_len = in.body_len + flush;
    out->win_first = in.win_first + flush;
    out->win_len = in.win_len - flush + to_win;
    while (out->win_first >= kPageTokens && !out->win.empty()) {
      out->win.erase(out->win.begin());
      out->win_first -= kPageTokens;
    }
    if (out->win_len == 0 && out->win_first > 0 && out->win.empty()) out->win_first = 0;
  };
  plan_stream(s.k, c.k, fk, &st.next.k, &st.w.k, &st.kb, &st.kw);
  plan_stream(s.v, c.v, fv, &st.next.v, &st.w.v, &st.vb, &st.vw);
  st.w.sink_len = s.sink_len;
  st.w.flush_k = fk;
  st.w.flush_v = fv;
  st.w.compute_norm = c.key_norm && !s.norm_ready && fk > 0;
  st.w.norm_offset = s.norm;
  st.w.n_new = n;
  st.w.kv_row = kv_row;
  st.w.q_row = q_row;
  st.next.sink_len = s.sink_len + to_sink;
  st.next.norm_ready = s.norm_ready || st.w.compute_norm;
  st.Point();
  return st;
}

// A comma-separated list of preset names (the benchmarks' --presets): false at the first unknown
// name, which *bad then holds.
inline bool ParsePresetList(const std::string& csv, std::vector<Preset>* out, std::string* bad) {
  out->clear();
  size_t start = 0;
  while (start <= csv.size()) {
    const size_t comma = std::min(csv.find(',', start), csv.size());
    const std::string name = csv.substr(start, comma - start);
    Preset p;
    if (!ParsePreset(name, &p)) {
      *bad = name;
      return false;
    }
    out->push_back(p);
    start = comma + 1;
  }
  return true;
}

// A tensor format with every field given.
inline TensorFormat Fmt(QuantMode m, int bits, Grouping g, int gs, int keep, int flush) {
  TensorFormat f;
  f.mode = m;
  f.bits = bits;
  f.grouping = g;
  f.group_size = gs;
  f.keep = keep;
  f.flush = flush;
  return f;
}

// Window activation t of head h, channel c for the quantize-append tests: every third token holds
// values whose quantization the sequential reference resolves by element order (signed zeros,
// constants, repeated extremes, two-level groups that sym and asym reconstruct equally), the rest
// random with outlier channels.
inline float EdgeActivation(int t, int h, int c, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  if (t % 3 != 0) return nd(rng) * ((c % 16 == 3) ? 8.f : 1.f);
  const bool neg_zero = ((t / 3 + c / 5 + h) & 1) != 0;
  switch ((t / 3) % 6) {
    case 0: return neg_zero ? -0.f : 0.f;
    case 1: return 0.75f;
    case 2: return (c % 4 == 0) ? (neg_zero ? -0.f : 0.f) : std::fabs(nd(rng)) + 0.5f;
    case 3: return (c % 9 == 4) ? (neg_zero ? -0.f : 0.f) : -std::fabs(nd(rng)) - 0.25f;
    case 4: return (c % 2) ? 1.f : -1.f;
    default: return std::round(nd(rng) * 2.f) / 2.f;
  }
}

// Overwrites every window token of both streams of s with EdgeActivation values.
inline void FillEdgeWindow(Arena& a, const TSeq& s, int hkv, int d, DType dt, std::mt19937& rng) {
  for (const TStream* st : {&s.k, &s.v})
    for (int i = 0; i < st->win_len; ++i) {
      const int idx = st->win_first + i;
      uint16_t* p = reinterpret_cast<uint16_t*>(a.bytes().data() + st->win[size_t(idx / kPageTokens)]);
      for (int h = 0; h < hkv; ++h)
        for (int c = 0; c < d; ++c)
          p[(int64_t{h} * kPageTokens + idx % kPageTokens) * d + c] = ToAct(EdgeActivation(i, h, c, rng), dt);
    }
}

inline std::vector<uint16_t> RandomActs(int64_t n, DType dt, std::mt19937& rng, float scale) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = ToAct(nd(rng) * scale, dt);
  return v;
}

}  // namespace testing
}  // namespace kvq
