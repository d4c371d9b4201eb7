// The CPU reference step: flush (quantize the oldest window tokens into the body), append, and
// attention over sink + body + window, reading the stored layout directly. Threads over
// (sequence, KV head) for the quantize-append and over (sequence, KV head, query block) for the
// attention; each attention item walks the tokens in tiles of at most kTile tokens, dequantizing
// one K tile and one V tile into small stack buffers, with an online softmax. The rows of an item
// that see a whole tile (all of them but the causal diagonal's, in a prefill) go through it
// together when there are enough of them (BlockedTile: register-blocked Q.K^T and P.V); decode
// rows and the diagonal go one row at a time. The two differ only in float summation order.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kvq/reference.h"

namespace kvq {
namespace {

// The attention's hot functions are compiled twice on x86-64 GCC, for the baseline (SSE2) and for
// AVX2, and picked at load time (ifunc), so one binary runs on every CI machine and uses wider
// vectors where they exist. The source fixes the summation order (no -ffast-math, no contraction),
// so both versions compute bit-identical results.
#if !defined(KVQ_CPU_CLONES)  // -DKVQ_CPU_CLONES= builds the baseline only
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define KVQ_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KVQ_CPU_CLONES
#endif
#endif

constexpr int kTile = 32;       // tokens per attention tile (divides every group size)
// Query rows per item (more when one GQA group alone has more heads). Every item dequantizes each
// tile it walks, so larger items share one dequantized tile among more rows: at 96 rows (32 query
// tokens of a 3-head GQA group) a prefill spends ~10% in LoadTile, at 16 rows it spent ~30%.
constexpr int kMaxRows = 96;
constexpr int kLanes = 8;       // independent partial sums in dot products (vectorizable order)

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A persistent pool of hardware_concurrency - 1 workers: a decode step of a 30-layer model makes
// ~90 parallel loops per token, and starting threads for each cost more than the loops' work.
// One loop runs on the pool at a time; a caller that finds it busy (another thread's step, or
// a nested call) runs its loop inline, so concurrent callers never wait on each other.
class WorkerPool {
 public:
  static WorkerPool& Get() {
    static WorkerPool pool(int(std::thread::hardware_concurrency()) - 1);
    return pool;
  }

  int workers() const { return int(threads_.size()); }

  // Runs fn(i, tid) for i in [0, count) on `participants` threads (the caller is tid 0). The
  // caller never waits for a worker that has not started yet (under load a worker may be
  // scheduled late): once the caller ran out of items it closes the loop and waits only for the
  // workers that joined it.
  void Run(int64_t count, int participants, const std::function<void(int64_t, int)>& fn) {
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    const int helpers = std::min(participants - 1, workers());
    if (!run.owns_lock() || helpers <= 0) {
      for (int64_t i = 0; i < count; ++i) fn(i, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &fn;
      count_ = count;
      next_.store(0);
      helpers_ = helpers;
      open_ = true;
      ++generation_;
    }
    cv_.notify_all();
    Loop(0);
    std::unique_lock<std::mutex> lock(mu_);
    open_ = false;
    done_cv_.wait(lock, [&] { return active_ == 0; });
    job_ = nullptr;
  }

  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  explicit WorkerPool(int n) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this, i] { Worker(i + 1); });
  }

  void Loop(int tid) {
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) (*job_)(i, tid);
  }

  void Worker(int tid) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (!open_ || tid > helpers_) continue;
        ++active_;
      }
      Loop(tid);
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
  int helpers_ = 0;
  bool open_ = false;  // a loop is running and workers may still join it
  int active_ = 0;     // workers inside the current loop
  std::vector<std::thread> threads_;
};

// Runs fn(i, tid) for i in [0, count) on up to `threads` threads (0 = hardware concurrency);
// tid < the number of threads used.
template <typename F>
void ParallelFor(int64_t count, int threads, F&& fn) {
  if (count <= 0) return;
  int t = threads > 0 ? threads : int(std::thread::hardware_concurrency());
  if (t < 1) t = 1;
  if (int64_t(t) > count) t = int(count);
  if (t == 1) {
    for (int64_t i = 0; i < count; ++i) fn(i, 0);
    return;
  }
  const std::function<void(int64_t, int)> job = [&fn](int64_t i, int tid) { fn(i, tid); };
  WorkerPool::Get().Run(count, t, job);
}

// One stream (K or V) of one sequence as the kernels walk it.
struct Stream {
  const TensorFormat* fmt = nullptr;
  StreamLayout layout;
  const StreamView* view = nullptr;
  int32_t flush = 0;
  int32_t body_post = 0;   // body length after the flush
  int32_t win_post = 0;    // window length after flush and append
  int32_t win_base = 0;    // page-array index of the first post-flush window token
};

inline uint16_t* FpToken(uint8_t* arena, int64_t page, int slot, int h, int d) {
  return reinterpret_cast<uint16_t*>(arena + page + FullTokenOffset(slot, h, d));
}
inline const uint16_t* FpToken(const uint8_t* arena, int64_t page, int slot, int h, int d) {
  return reinterpret_cast<const uint16_t*>(arena + page + FullTokenOffset(slot, h, d));
}

// Bytes of the head `h` block of a quantized body page.
inline int64_t HeadBase(const Stream& s, int64_t page, int h) { return page + int64_t(h) * s.layout.head_bytes; }

struct SeqInfo {
  Stream k, v;
  int32_t sink_cfg = 0;
  int32_t sink_post = 0;
  int32_t n_sink = 0;   // new tokens that go to the sink
  int32_t length = 0;   // after append
};

SeqInfo MakeSeqInfo(const StepParams& p, const SeqWork& w, const QuantConfig& cfg) {
  SeqInfo si;
  si.sink_cfg = cfg.sink;
  si.n_sink = cfg.sink > 0 ? std::max(0, std::min(w.n_new, cfg.sink - w.sink_len)) : 0;
  si.sink_post = w.sink_len + si.n_sink;
  const int32_t n_win = w.n_new - si.n_sink;
  Stream* ss[2] = {&si.k, &si.v};
  const TensorFormat* fs[2] = {&cfg.k, &cfg.v};
  const StreamView* vs[2] = {&w.k, &w.v};
  const int32_t fl[2] = {w.flush_k, w.flush_v};
  for (int i = 0; i < 2; ++i) {
    Stream& s = *ss[i];
    s.fmt = fs[i];
    s.layout = MakeStreamLayout(*fs[i], p.num_kv_heads, p.head_dim);
    s.view = vs[i];
    s.flush = fl[i];
    s.body_post = vs[i]->body_len + fl[i];
    s.win_post = vs[i]->win_len - fl[i] + n_win;
    s.win_base = vs[i]->win_first + fl[i];
  }
  si.length = si.sink_post + si.k.body_post + si.k.win_post;
  return si;
}

// min_new: 1 for a step with attention, 0 for the quantize-append alone (a flush-only batch).
std::string CheckStep(const StepParams& p, const SeqWork* works, const QuantConfig* configs, int num_seqs,
                      const uint8_t* arena, int min_new = 1) {
  if (arena == nullptr) return "arena is null";
  if (p.num_kv_heads < 1 || p.num_q_heads < p.num_kv_heads || p.num_q_heads % p.num_kv_heads != 0)
    return "num_q_heads must be a positive multiple of num_kv_heads";
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return "head_dim must be 64, 128 or 256";
  if (p.dtype != DType::kF16 && p.dtype != DType::kBF16) return "dtype must be fp16 or bf16";
  if (num_seqs < 0) return "num_seqs < 0";
  if (num_seqs > 0 && (!p.q || !p.k_new || !p.v_new || !p.o)) return "null q/k_new/v_new/o";
  for (int i = 0; i < num_seqs; ++i) {
    const SeqWork& w = works[i];
    const QuantConfig& cfg = configs[i];
    const std::string e = ValidateConfig(cfg, p.head_dim);
    if (!e.empty()) return "sequence " + std::to_string(i) + ": " + e;
    const std::string si_name = "sequence " + std::to_string(i) + ": ";
    if (w.n_new < min_new) return si_name + "n_new must be >= " + std::to_string(min_new);
    if (w.sink_len < 0 || w.sink_len > cfg.sink) return si_name + "sink_len out of range";
    if (cfg.sink > 0 && (w.k.sink_page < 0 || w.v.sink_page < 0)) return si_name + "missing sink page";
    if (w.kv_row < 0 || w.q_row < 0) return si_name + "negative row";
    const SeqInfo si = MakeSeqInfo(p, w, cfg);
    const Stream* ss[2] = {&si.k, &si.v};
    for (const Stream* s : ss) {
      const StreamView& v = *s->view;
      if (v.body_len < 0 || v.win_len < 0 || v.win_first < 0 || v.win_first >= kPageTokens || s->flush < 0 ||
          s->flush > v.win_len)
        return si_name + "bad stream lengths";
      if (s->flush > 0 && !s->fmt->quantized()) return si_name + "flush of a full-precision tensor";
      if (s->fmt->quantized() && (v.body_len % (s->fmt->grouping == Grouping::kAlongTokens ? s->fmt->group_size : 1)))
        return si_name + "body length not a multiple of the group size";
      if (s->fmt->quantized() && s->fmt->grouping == Grouping::kAlongTokens && s->flush % s->fmt->group_size)
        return si_name + "flush not a multiple of the group size";
      if (v.num_body_pages < CeilDiv(s->body_post, kPageTokens) || (v.num_body_pages > 0 && !v.body_pages))
        return si_name + "too few body pages";
      const int64_t win_end = int64_t(v.win_first) + v.win_len + (w.n_new - si.n_sink);
      if ((v.win_len + (w.n_new - si.n_sink) > 0 && v.num_win_pages < CeilDiv(win_end, kPageTokens)) ||
          (v.num_win_pages > 0 && !v.win_pages))
        return si_name + "too few window pages";
    }
    if (si.sink_post < cfg.sink && (si.k.body_post + si.k.win_post + si.v.body_post + si.v.win_post) > 0)
      return si_name + "tokens after an unfilled sink";
    if (si.k.body_post + si.k.win_post != si.v.body_post + si.v.win_post) return si_name + "K and V lengths differ";
    if (cfg.key_norm && si.k.body_post > 0 && w.norm_offset < 0) return si_name + "key_norm without norm factors";
    if (w.compute_norm && (!cfg.key_norm || w.norm_offset < 0)) return si_name + "compute_norm without key_norm";
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Quantize-append.

// Reads window token at page-array index `idx` (flush reads pre-flush indices from win_first).
inline const uint16_t* WinToken(const uint8_t* arena, const Stream& s, int64_t idx, int h, int d) {
  return FpToken(arena, s.view->win_pages[idx / kPageTokens], int(idx % kPageTokens), h, d);
}

// Quantizes the flush tokens of stream `s`, head h. `norm` is f[D] or null. Returns false on a
// value beyond fp16 range.
bool FlushStream(uint8_t* arena, const Stream& s, int h, int hkv, int d, DType dt, const float* norm) {
  const TensorFormat& f = *s.fmt;
  const int G = f.group_size;
  const int wpg = s.layout.words_per_group;
  float x[kMaxGroupSize];
  uint8_t codes[kMaxGroupSize];
  const int64_t first = s.view->win_first;
  auto store = [&](int64_t body_idx, int g, uint16_t sc, uint16_t zr) {
    const int64_t base = HeadBase(s, s.view->body_pages[body_idx / kPageTokens], h);
    PackCodes(codes, G, f.bits, reinterpret_cast<uint32_t*>(arena + base + int64_t(g) * wpg * 4));
    std::memcpy(arena + base + s.layout.scales_offset + 2 * g, &sc, 2);
    if (f.has_zeros()) std::memcpy(arena + base + s.layout.zeros_offset + 2 * g, &zr, 2);
  };
  if (f.grouping == Grouping::kAlongChannels) {
    const int gpt = d / G;
    for (int32_t j = 0; j < s.flush; ++j) {
      const uint16_t* tok = WinToken(arena, s, first + j, h, d);
      const int64_t bi = int64_t(s.view->body_len) + j;
      const int slot = int(bi % kPageTokens);
      for (int gi = 0; gi < gpt; ++gi) {
        for (int i = 0; i < G; ++i) {
          const float val = LoadAct(tok + gi * G + i, dt);
          x[i] = norm ? DivRn(val, norm[gi * G + i]) : val;
        }
        uint16_t sc = 0, zr = 0;
        if (!QuantizeGroupRef(x, G, f.bits, f.mode, codes, &sc, &zr)) return false;
        store(bi, slot * gpt + gi, sc, zr);
      }
    }
  } else {
    for (int32_t b0 = 0; b0 < s.flush; b0 += G) {
      const int64_t bi = int64_t(s.view->body_len) + b0;
      const int slot = int(bi % kPageTokens);
      const uint16_t* toks[kMaxGroupSize];
      for (int i = 0; i < G; ++i) toks[i] = WinToken(arena, s, first + b0 + i, h, d);
      for (int c = 0; c < d; ++c) {
        for (int i = 0; i < G; ++i) {
          const float val = LoadAct(toks[i] + c, dt);
          x[i] = norm ? DivRn(val, norm[c]) : val;
        }
        uint16_t sc = 0, zr = 0;
        if (!QuantizeGroupRef(x, G, f.bits, f.mode, codes, &sc, &zr)) return false;
        store(bi, (slot / G) * d + c, sc, zr);
      }
    }
  }
  return true;
}

// Flush of one (sequence, KV head): writes only body slots past the committed body and the
// freshly allocated key-norm factors. Returns false on a value beyond fp16 range.
bool FlushItem(const StepParams& p, const SeqWork& w, const QuantConfig& cfg, uint8_t* arena, int h) {
  if (w.flush_done) return true;  // written by the flush-only batch after the previous step
  const int hkv = p.num_kv_heads, d = p.head_dim;
  const SeqInfo si = MakeSeqInfo(p, w, cfg);
  float* norm = nullptr;
  if (cfg.key_norm && w.norm_offset >= 0) norm = reinterpret_cast<float*>(arena + w.norm_offset) + int64_t(h) * d;
  if (si.k.flush > 0) {
    if (w.compute_norm) {
      std::vector<float> mx(size_t(d), 0.f);
      for (int32_t j = 0; j < si.k.flush; ++j) {
        const uint16_t* tok = WinToken(arena, si.k, int64_t(w.k.win_first) + j, h, d);
        for (int c = 0; c < d; ++c) mx[size_t(c)] = MaxF(mx[size_t(c)], AbsF(LoadAct(tok + c, p.dtype)));
      }
      for (int c = 0; c < d; ++c) norm[c] = KeyNormFactor(mx[size_t(c)]);
    }
    if (!FlushStream(arena, si.k, h, hkv, d, p.dtype, cfg.key_norm ? norm : nullptr)) return false;
  }
  if (si.v.flush > 0 && !FlushStream(arena, si.v, h, hkv, d, p.dtype, nullptr)) return false;
  return true;
}

// Append of one (sequence, KV head): sink slots first, then the windows after their post-flush
// last token. (A truncating step overwrites window slots of the committed state here, so it runs
// only after every flush of the step succeeded.)
void AppendItem(const StepParams& p, const SeqWork& w, const QuantConfig& cfg, uint8_t* arena, int h) {
  const int hkv = p.num_kv_heads, d = p.head_dim;
  const SeqInfo si = MakeSeqInfo(p, w, cfg);
  const uint16_t* kin = static_cast<const uint16_t*>(p.k_new);
  const uint16_t* vin = static_cast<const uint16_t*>(p.v_new);
  for (int32_t i = 0; i < w.n_new; ++i) {
    const int64_t row = (w.kv_row + i) * hkv + h;
    const Stream* ss[2] = {&si.k, &si.v};
    const uint16_t* src[2] = {kin + row * d, vin + row * d};
    for (int t = 0; t < 2; ++t) {
      const Stream& s = *ss[t];
      uint16_t* dst;
      if (i < si.n_sink) {
        dst = FpToken(arena, s.view->sink_page, w.sink_len + i, h, d);
      } else {
        const int64_t idx = int64_t(s.view->win_first) + s.view->win_len + (i - si.n_sink);
        dst = FpToken(arena, s.view->win_pages[idx / kPageTokens], int(idx % kPageTokens), h, d);
      }
      std::memcpy(dst, src[t], size_t(d) * 2);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Attention.

// fp16 bits to float without branches, exact for every finite value (normal and subnormal: the
// magnitude bits shifted into a float and scaled by 2^112 is an exact power-of-two product);
// inf/NaN fixed up by a select. Vectorizes, unlike numeric.h's scalar version (which stays the
// definition for device code built with flush-to-zero).
inline float HalfToFloatFast(uint16_t h) {
  const uint32_t mag = uint32_t(h & 0x7fffu) << 13;
  float f = BitsAsFloat(mag) * 0x1p112f;
  uint32_t u = FloatAsBits(f);
  u = (h & 0x7c00u) == 0x7c00u ? (mag | 0x7f800000u) : u;
  return BitsAsFloat(u | (uint32_t(h & 0x8000u) << 16));
}

inline void LoadRow(const uint16_t* src, int d, DType dt, float* out) {
  uint32_t tmp[256];
  if (dt == DType::kF16) {
    // Sign and magnitude moved into float position, then scaled by 2^112: exact for every finite
    // half (normal or subnormal). Rows with inf/NaN take the scalar path.
    uint32_t special = 0;
    for (int c = 0; c < d; ++c) {
      const uint32_t h = src[c];
      tmp[c] = ((h & 0x8000u) << 16) | ((h & 0x7fffu) << 13);
      special |= ((h & 0x7c00u) + 0x0400u) & 0x8000u;
    }
    if (special) {
      for (int c = 0; c < d; ++c) out[c] = HalfToFloatFast(src[c]);
      return;
    }
    std::memcpy(out, tmp, size_t(d) * 4);
    for (int c = 0; c < d; ++c) out[c] *= 0x1p112f;
  } else {
    for (int c = 0; c < d; ++c) tmp[c] = uint32_t(src[c]) << 16;
    std::memcpy(out, tmp, size_t(d) * 4);
  }
}

inline void Prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// Codes to floats through small tables: a byte holds 4 two-bit or 2 four-bit codes; 12 bits hold
// 4 three-bit codes. Stream bit k is bit k % 8 of byte k / 8 (little-endian words).
struct CodeTables {
  float t2[256][4];
  float t4[256][2];
  float t3[4096][4];
  CodeTables() {
    for (int x = 0; x < 256; ++x) {
      for (int k = 0; k < 4; ++k) t2[x][k] = float((x >> (2 * k)) & 3);
      for (int k = 0; k < 2; ++k) t4[x][k] = float((x >> (4 * k)) & 15);
    }
    for (int x = 0; x < 4096; ++x)
      for (int k = 0; k < 4; ++k) t3[x][k] = float((x >> (3 * k)) & 7);
  }
};

const CodeTables& Tables() {
  static const CodeTables tables;
  return tables;
}

// cf[j] = code (i0 + j) of the group as a float, j < cnt.
inline void CodesToFloat(const CodeTables& tb, const uint32_t* words, int bits, int i0, int cnt, float* cf) {
  const uint8_t* by = reinterpret_cast<const uint8_t*>(words);
  if ((i0 | cnt) % 4 != 0) {
    for (int j = 0; j < cnt; ++j) cf[j] = float(UnpackCode(words, i0 + j, bits));
    return;
  }
  switch (bits) {
    case 2:
      for (int m = 0; m < cnt / 4; ++m) std::memcpy(cf + 4 * m, tb.t2[by[i0 / 4 + m]], 16);
      break;
    case 4:
      for (int m = 0; m < cnt / 2; ++m) std::memcpy(cf + 2 * m, tb.t4[by[i0 / 2 + m]], 8);
      break;
    case 3:
      for (int m = 0; m < cnt / 4; ++m) {
        const int bit = 12 * (i0 / 4 + m);
        const uint32_t w = uint32_t(by[bit >> 3]) | (uint32_t(by[(bit >> 3) + 1]) << 8);
        std::memcpy(cf + 4 * m, tb.t3[(w >> (bit & 7)) & 0xfffu], 16);
      }
      break;
    default:
      for (int j = 0; j < cnt; ++j) cf[j] = float(by[i0 + j]);
      break;
  }
}

// x^ = code * a + b for a group's stored scale/zero.
inline void GroupAffine(const TensorFormat& f, uint16_t sc, uint16_t zr, float* a, float* b) {
  const bool asym = f.mode == QuantMode::kAsym || (f.mode == QuantMode::kHybrid && (sc & 0x8000u));
  const float s = HalfBitsToFloat(uint16_t(sc & 0x7fffu));
  *a = s;
  *b = asym ? HalfBitsToFloat(zr) : -float(SymLevels(f.bits)) * s;
}

// Writes tokens [t0, t0 + cnt) (absolute positions, all in one segment of stream s) of head h
// into out[cnt][d] as floats.
KVQ_CPU_CLONES void LoadTile(const uint8_t* arena, const SeqInfo& si, const Stream& s, int h, int hkv, int d, DType dt,
              int32_t t0, int cnt, float* out) {
  if (t0 < si.sink_post) {
    for (int j = 0; j < cnt; ++j) {
      LoadRow(FpToken(arena, s.view->sink_page, t0 + j, h, d), d, dt, out + j * d);
    }
    return;
  }
  const int32_t b0 = t0 - si.sink_post;
  if (b0 >= s.body_post) {
    const int64_t idx0 = int64_t(s.win_base) + (b0 - s.body_post);
    const int64_t win_end = int64_t(s.win_base) + s.win_post;
    for (int j = 0; j < cnt; ++j) {
      const int64_t idx = idx0 + j;
      // The rows of one head are 2*Hkv*D bytes apart: prefetch a tile ahead (memory-bound here).
      const int64_t ahead = idx + kTile;
      if (ahead < win_end) {
        const uint8_t* pf = reinterpret_cast<const uint8_t*>(
            FpToken(arena, s.view->win_pages[ahead / kPageTokens], int(ahead % kPageTokens), h, d));
        for (int b = 0; b < d * 2; b += 64) Prefetch(pf + b);
      }
      LoadRow(FpToken(arena, s.view->win_pages[idx / kPageTokens], int(idx % kPageTokens), h, d), d, dt,
              out + j * d);
    }
    return;
  }
  // Body: the tile lies in one page and one kTile-aligned block of body tokens.
  const TensorFormat& f = *s.fmt;
  const int G = f.group_size;
  const int wpg = s.layout.words_per_group;
  const uint8_t* base = arena + HeadBase(s, s.view->body_pages[b0 / kPageTokens], h);
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(base + s.layout.scales_offset);
  const uint16_t* zeros = reinterpret_cast<const uint16_t*>(base + s.layout.zeros_offset);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(base);
  const int slot0 = b0 % kPageTokens;
  const CodeTables& tb = Tables();
  float cf[kMaxGroupSize];
  if (f.grouping == Grouping::kAlongChannels) {
    const int gpt = d / G;
    for (int j = 0; j < cnt; ++j) {
      const int slot = slot0 + j;
      for (int gi = 0; gi < gpt; ++gi) {
        const int g = slot * gpt + gi;
        float a, b;
        GroupAffine(f, scales[g], f.has_zeros() ? zeros[g] : uint16_t(0), &a, &b);
        CodesToFloat(tb, words + int64_t(g) * wpg, f.bits, 0, G, cf);
        float* o = out + j * d + gi * G;
        for (int i = 0; i < G; ++i) o[i] = cf[i] * a + b;
      }
    }
  } else {
    const int gbase = (slot0 / G) * d;
    const int i0 = slot0 % G;
    for (int c = 0; c < d; ++c) {
      const int g = gbase + c;
      float a, b;
      GroupAffine(f, scales[g], f.has_zeros() ? zeros[g] : uint16_t(0), &a, &b);
      CodesToFloat(tb, words + int64_t(g) * wpg, f.bits, i0, cnt, cf);
      for (int j = 0; j < cnt; ++j) out[j * d + c] = cf[j] * a + b;
    }
  }
}

// Cephes' expf polynomial after the range reduction: e^(v - k ln 2) for kf = k, on a float or an
// 8-lane vector (ExpNonPositive and the blocked path's Exp8NonPositive: the same operations, so the
// same results).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 8-lane vectors by value: inline functions only, no ABI crossing
#endif
template <typename F>
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline F ExpReduced(F v, F kf) {
  const F r = (v - kf * 0.693359375f) - kf * -2.12194440e-4f;
  F y = F{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * (r * r) + r + 1.f;
}
constexpr uint32_t kExpClampBits = 0xC2AE999Au;  // -87.3f: below it e^x is a denormal
constexpr float kLog2e = 1.44269504088896341f;

// exp(x) for x <= 0 (scores minus the running max), n <= kTile, in a form GCC vectorizes:
// Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, 2^k by exponent bits),
// within ~2 ulp of expf; inputs below -87.3 give ~1e-38 instead of a denormal or 0.
inline void ExpNonPositive(float* x, int n) {
  // Clamp to >= -87.3 in the integer domain (x <= 0: a larger magnitude is a larger unsigned bit
  // pattern; +0 stays 0), which vectorizes where a float compare would not (-ftrapping-math).
  uint32_t bits[kTile];
  std::memcpy(bits, x, size_t(n) * 4);
  for (int j = 0; j < n; ++j) bits[j] = bits[j] < kExpClampBits ? bits[j] : kExpClampBits;
  std::memcpy(x, bits, size_t(n) * 4);
  for (int j = 0; j < n; ++j) {
    const float v = x[j];
    const float fx = v * kLog2e + 0.5f;           // >= -125.5
    const int32_t k = int32_t(fx + 128.f) - 128;  // floor(fx): truncation of a positive
    x[j] = ExpReduced(v, float(k));
    bits[j] = uint32_t(k + 127) << 23;
  }
  float scale[kTile];
  std::memcpy(scale, bits, size_t(n) * 4);
  for (int j = 0; j < n; ++j) x[j] *= scale[j];
}

inline float Dot(const float* a, const float* b, int d) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int c = 0; c < d; c += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[c + l] * b[c + l];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

struct AttnItem {
  int32_t seq;
  int32_t h;
  int32_t q0, q1;        // query tokens [q0, q1) of the sequence
  int32_t t_lo, t_hi;    // token range of this split (t_hi = INT32_MAX: to the end)
  int64_t partial = -1;  // split-KV: index of this item's (m, l, acc) slot; -1 writes o directly
};

// Split-KV partial state of one item: rows x (m, l, acc[D]).
struct Partials {
  int max_rows = 0, d = 0;
  std::vector<float> data;
  float* slot(int64_t i) { return data.data() + size_t(i) * size_t(max_rows) * size_t(d + 2); }
};

struct Scratch {
  std::vector<float> q, qn, qt, qnt, acc, m, l, ktile, vtile, st, mx;
};

// The blocked (prefill) path: items with many query rows compute the scores of kRowBlock rows at
// once against a whole tile, rows in vector lanes, with every accumulator in a register. GCC and
// Clang vector types keep the accumulators out of memory (plain arrays of them were spilled);
// elementwise IEEE operations in a fixed order, so the AVX2 and baseline clones still agree bit
// for bit. Other compilers take the per-row path everywhere.
#if defined(__GNUC__)
#define KVQ_BLOCKED_ATTENTION 1
#define KVQ_INLINE inline __attribute__((always_inline))
typedef float V8 __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));
typedef uint32_t V8u __attribute__((vector_size(32)));
KVQ_INLINE V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
KVQ_INLINE void Store8(float* p, const V8& v) { std::memcpy(p, &v, sizeof v); }

// ExpNonPositive on 8 lanes, the same operations per element (so the same results).
KVQ_INLINE V8 Exp8NonPositive(const V8& x_in) {
  V8 x = x_in;
  V8u bits;
  std::memcpy(&bits, &x, sizeof x);
  const V8u lim = V8u{} + kExpClampBits;
  bits = bits < lim ? bits : lim;
  std::memcpy(&x, &bits, sizeof x);
  const V8 fx = x * kLog2e + 0.5f;
  const V8i k = __builtin_convertvector(fx + 128.f, V8i) - 128;
  const V8 y = ExpReduced(x, __builtin_convertvector(k, V8));
  const V8u sb = (__builtin_convertvector(k, V8u) + 127u) << 23;
  V8 scale;
  std::memcpy(&scale, &sb, sizeof scale);
  return y * scale;
}
#else
#define KVQ_BLOCKED_ATTENTION 0
#define KVQ_INLINE inline
#endif

constexpr int kRowBlock = 16;     // rows per score block (two vectors of 8); row arrays padded by it
constexpr int kBlockMinRows = 8;  // fewer rows that see a whole tile take the per-row path

#if KVQ_BLOCKED_ATTENTION
// Scores of kRowBlock rows against the cnt tokens of a K tile (rows of d floats):
// st[j * rs + i] = sum_c qt[c * rs + i] * k[j][c] for i < kRowBlock, summed in channel order.
// qt is the transposed (and scaled) Q of the item, offset to the block's first row. Four tokens
// per pass: 8 accumulators, per channel 2 loads of Q, 4 broadcasts of K.
KVQ_INLINE void ScoreBlock(const float* qt, int rs, const float* kt, int d, int cnt, float* st) {
  int j = 0;
  for (; j + 4 <= cnt; j += 4) {
    V8 a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
    const float* k0 = kt + size_t(j) * d;
    const float* k1 = k0 + d;
    const float* k2 = k1 + d;
    const float* k3 = k2 + d;
    for (int c = 0; c < d; ++c) {
      const float* qc = qt + size_t(c) * rs;
      const V8 q0 = Load8(qc), q1 = Load8(qc + 8);
      const float x0 = k0[c], x1 = k1[c], x2 = k2[c], x3 = k3[c];
      a00 += q0 * x0;
      a01 += q1 * x0;
      a10 += q0 * x1;
      a11 += q1 * x1;
      a20 += q0 * x2;
      a21 += q1 * x2;
      a30 += q0 * x3;
      a31 += q1 * x3;
    }
    float* s = st + size_t(j) * rs;
    Store8(s, a00);
    Store8(s + 8, a01);
    Store8(s + rs, a10);
    Store8(s + rs + 8, a11);
    Store8(s + 2 * rs, a20);
    Store8(s + 2 * rs + 8, a21);
    Store8(s + 3 * rs, a30);
    Store8(s + 3 * rs + 8, a31);
  }
  for (; j < cnt; ++j) {
    V8 a0{}, a1{};
    const float* k0 = kt + size_t(j) * d;
    for (int c = 0; c < d; ++c) {
      const float* qc = qt + size_t(c) * rs;
      a0 += Load8(qc) * k0[c];
      a1 += Load8(qc + 8) * k0[c];
    }
    Store8(st + size_t(j) * rs, a0);
    Store8(st + size_t(j) * rs + 8, a1);
  }
}

// acc[i][c] += sum_j p[j * rs + i] * v[j][c] for 4 rows i (acc rows d apart), one token after the
// other: 4 rows x 16 channels of accumulators stay in registers over the whole tile, and a token
// costs 2 loads of V and 4 broadcasts of P. (The per-row path's four-token sums
// ((p0 v0 + p1 v1) + (p2 v2 + p3 v3)) need 16 broadcasts live and spilled accumulators: ~15%
// slower.)
KVQ_INLINE void PvBlock4(const float* p, int rs, const float* vt, int d, int cnt, float* acc) {
  for (int c0 = 0; c0 < d; c0 += 16) {
    V8 a[4][2];
    for (int i = 0; i < 4; ++i) {
      a[i][0] = Load8(acc + size_t(i) * d + c0);
      a[i][1] = Load8(acc + size_t(i) * d + c0 + 8);
    }
    for (int j = 0; j < cnt; ++j) {
      const float* v = vt + size_t(j) * d + c0;
      const V8 w0 = Load8(v), w1 = Load8(v + 8);
      for (int i = 0; i < 4; ++i) {
        const float pj = p[size_t(j) * rs + i];
        a[i][0] += pj * w0;
        a[i][1] += pj * w1;
      }
    }
    for (int i = 0; i < 4; ++i) {
      Store8(acc + size_t(i) * d + c0, a[i][0]);
      Store8(acc + size_t(i) * d + c0 + 8, a[i][1]);
    }
  }
}

// The online softmax update of one tile for rows [r0, rows) that all see the whole tile (cnt
// tokens in sc.ktile / sc.vtile), in blocks of kRowBlock rows running into the padding (rows up
// to rs); the same steps as AttentionItem's per-row loop, rows in vector lanes. Kept out of
// AttentionItem so the per-row (decode) loop there compiles as it did without it.
KVQ_CPU_CLONES __attribute__((noinline)) void BlockedTile(const float* qt, int rs, int r0, int rows, int d, int cnt,
                                                          Scratch& sc) {
  const int nb = (rows - r0 + kRowBlock - 1) / kRowBlock * kRowBlock;
  float* st = sc.st.data() + r0;
  for (int b = 0; b < nb; b += kRowBlock) ScoreBlock(qt + r0 + b, rs, sc.ktile.data(), d, cnt, st + b);
  float* m = sc.m.data() + r0;
  float* l = sc.l.data() + r0;
  float* mn = sc.mx.data() + r0;
  for (int i = 0; i < nb; i += 8) {
    V8 mx = V8{} - std::numeric_limits<float>::infinity();
    for (int j = 0; j < cnt; ++j) {
      const V8 x = Load8(st + size_t(j) * rs + i);
      mx = mx < x ? x : mx;  // std::max(mx, x) per lane
    }
    const V8 m_old = Load8(m + i);
    Store8(mn + i, m_old < mx ? mx : m_old);
  }
  for (int i = 0; i < nb; ++i) {
    const float m_old = m[i], m_new = mn[i];
    if (m_new > m_old) {
      const float corr = std::exp(m_old - m_new);  // 0 for the first tile
      l[i] *= corr;
      float* acc = sc.acc.data() + size_t(r0 + i) * d;
      for (int c = 0; c < d; ++c) acc[c] *= corr;
      m[i] = m_new;
    }
  }
  for (int i = 0; i < nb; i += 8) {
    const V8 m_new = Load8(mn + i);
    V8 lsum{};
    for (int j = 0; j < cnt; ++j) {
      float* sj = st + size_t(j) * rs + i;
      const V8 e = Exp8NonPositive(Load8(sj) - m_new);
      Store8(sj, e);
      lsum += e;
    }
    Store8(l + i, Load8(l + i) + lsum);
  }
  float* acc = sc.acc.data() + size_t(r0) * d;
  for (int i = 0; i < nb; i += 4) PvBlock4(st + i, rs, sc.vtile.data(), d, cnt, acc + size_t(i) * d);
}
#endif

KVQ_CPU_CLONES void AttentionItem(const StepParams& p, const SeqWork& w, const QuantConfig& cfg, const uint8_t* arena,
                   const AttnItem& it, Scratch& sc, Partials* partials) {
  const int hkv = p.num_kv_heads, hq = p.num_q_heads, d = p.head_dim, g = hq / hkv;
  const DType dt = p.dtype;
  const SeqInfo si = MakeSeqInfo(p, w, cfg);
  const int rows = (it.q1 - it.q0) * g;
  // Items with enough rows also keep Q transposed ([d][rs], rows contiguous) for the blocked path;
  // row arrays are padded to rs rows (padding rows have q = 0 and are never written out).
  const bool blocked = KVQ_BLOCKED_ATTENTION && rows >= kBlockMinRows;
  const int rs = blocked ? (rows + kRowBlock + 7) / 8 * 8 : rows;
  const float scale = p.softmax_scale > 0.f ? p.softmax_scale : 1.f / std::sqrt(float(d));
  const bool use_norm = cfg.key_norm && si.k.body_post > 0;
  const float* norm = use_norm ? reinterpret_cast<const float*>(arena + w.norm_offset) + int64_t(it.h) * d : nullptr;
  sc.q.resize(size_t(rs) * d);
  sc.qn.resize(use_norm ? size_t(rs) * d : 0);
  sc.acc.assign(size_t(rs) * d, 0.f);
  sc.m.assign(size_t(rs), -std::numeric_limits<float>::infinity());
  sc.l.assign(size_t(rs), 0.f);
  sc.ktile.resize(size_t(kTile) * d);
  sc.vtile.resize(size_t(kTile) * d);
  std::vector<int32_t> pos(static_cast<size_t>(rows));
  const uint16_t* qin = static_cast<const uint16_t*>(p.q);
  for (int r = 0; r < rows; ++r) {
    const int qi = it.q0 + r / g;
    const int head = it.h * g + r % g;
    pos[size_t(r)] = si.length - w.n_new + qi;
    const uint16_t* src = qin + ((w.q_row + qi) * hq + head) * d;
    float* q = sc.q.data() + size_t(r) * d;
    for (int c = 0; c < d; ++c) q[c] = LoadAct(src + c, dt) * scale;
    if (use_norm) {
      float* qn = sc.qn.data() + size_t(r) * d;
      for (int c = 0; c < d; ++c) qn[c] = q[c] * norm[c];
    }
  }
  if (blocked) {
    sc.qt.assign(size_t(rs) * d, 0.f);
    sc.qnt.assign(use_norm ? size_t(rs) * d : 0, 0.f);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < d; ++c) sc.qt[size_t(c) * rs + r] = sc.q[size_t(r) * d + c];
    if (use_norm)
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < d; ++c) sc.qnt[size_t(c) * rs + r] = sc.qn[size_t(r) * d + c];
    sc.st.resize(size_t(kTile) * rs);
    sc.mx.resize(size_t(rs));
  }
  const int32_t t_end = std::min(it.t_hi, pos[size_t(rows - 1)] + 1);  // the last row sees the most
  // Segment boundaries of K and V (absolute positions); tiles never cross one.
  const int32_t S = si.sink_post;
  int32_t bounds[5] = {S, S + si.k.body_post, S + si.v.body_post, t_end, t_end};
  std::sort(bounds, bounds + 5);
  float scores[kTile];
  int32_t t0 = it.t_lo;
  while (t0 < t_end) {
    int32_t t1 = std::min(t_end, t0 + kTile);
    if (t0 >= S) t1 = std::min(t1, S + ((t0 - S) / kTile + 1) * kTile);
    for (int32_t b : bounds)
      if (b > t0 && b < t1) t1 = b;
    const int cnt = t1 - t0;
    LoadTile(arena, si, si.k, it.h, hkv, d, dt, t0, cnt, sc.ktile.data());
    LoadTile(arena, si, si.v, it.h, hkv, d, dt, t0, cnt, sc.vtile.data());
    const bool k_body = t0 >= S && t0 < S + si.k.body_post;
    const float* qsrc = (k_body && use_norm) ? sc.qn.data() : sc.q.data();
    // Rows are in query order, so the rows that see the whole tile are a suffix [r_full, rows);
    // with enough of them they take the blocked path, the rest (the causal diagonal) the per-row one.
    int r_split = rows;
    if (blocked) {
      int r_full = rows;
      while (r_full > 0 && pos[size_t(r_full - 1)] >= t1 - 1) --r_full;
      if (rows - r_full >= kBlockMinRows) r_split = r_full;
    }
    for (int r = 0; r < r_split; ++r) {
      const int32_t pr = pos[size_t(r)];
      if (pr < t0) continue;
      const int valid = std::min(cnt, pr - t0 + 1);
      const float* q = qsrc + size_t(r) * d;
      float mx = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < valid; ++j) {
        scores[j] = Dot(q, sc.ktile.data() + size_t(j) * d, d);
        mx = std::max(mx, scores[j]);
      }
      const float m_old = sc.m[size_t(r)];
      const float m_new = std::max(m_old, mx);
      float* acc = sc.acc.data() + size_t(r) * d;
      if (m_new > m_old) {
        const float corr = std::exp(m_old - m_new);  // 0 for the first tile
        sc.l[size_t(r)] *= corr;
        for (int c = 0; c < d; ++c) acc[c] *= corr;
        sc.m[size_t(r)] = m_new;
      }
      for (int j = 0; j < valid; ++j) scores[j] -= m_new;
      ExpNonPositive(scores, valid);
      float lsum = 0.f;
      for (int j = 0; j < valid; ++j) lsum += scores[j];
      // Four tokens per pass over acc: a quarter of the loads and stores of acc.
      const float* vt = sc.vtile.data();
      int j = 0;
      for (; j + 4 <= valid; j += 4) {
        const float p0 = scores[j], p1 = scores[j + 1], p2 = scores[j + 2], p3 = scores[j + 3];
        const float* v0 = vt + size_t(j) * d;
        const float* v1 = v0 + d;
        const float* v2 = v1 + d;
        const float* v3 = v2 + d;
        for (int c = 0; c < d; ++c) acc[c] += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c]);
      }
      for (; j < valid; ++j) {
        const float pj = scores[j];
        const float* v = vt + size_t(j) * d;
        for (int c = 0; c < d; ++c) acc[c] += pj * v[c];
      }
      sc.l[size_t(r)] += lsum;
    }
#if KVQ_BLOCKED_ATTENTION
    if (r_split < rows) {
      const float* qt = (k_body && use_norm) ? sc.qnt.data() : sc.qt.data();
      BlockedTile(qt, rs, r_split, rows, d, cnt, sc);
    }
#endif
    t0 = t1;
  }
  if (it.partial >= 0) {
    float* slot = partials->slot(it.partial);
    for (int r = 0; r < rows; ++r) {
      float* row = slot + size_t(r) * size_t(d + 2);
      row[0] = sc.m[size_t(r)];
      row[1] = sc.l[size_t(r)];
      std::memcpy(row + 2, sc.acc.data() + size_t(r) * d, size_t(d) * 4);
    }
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(p.o);
  for (int r = 0; r < rows; ++r) {
    const int qi = it.q0 + r / g;
    const int head = it.h * g + r % g;
    uint16_t* dst = out + ((w.q_row + qi) * hq + head) * d;
    const float inv = 1.f / sc.l[size_t(r)];
    const float* acc = sc.acc.data() + size_t(r) * d;
    for (int c = 0; c < d; ++c) dst[c] = StoreAct(acc[c] * inv, dt);
  }
}

// The quantize-append of a batch CheckStep accepted.
Result QuantizeAppendChecked(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                             int num_seqs, uint8_t* arena, int threads) {
  const int hkv = params.num_kv_heads;
  std::atomic<int64_t> bad{-1};
  // Two phases: every flush first, then (only if all succeeded) every append, so a failed step
  // leaves the committed state of every sequence untouched and the caller can Abort.
  ParallelFor(int64_t(num_seqs) * hkv, threads, [&](int64_t i, int) {
    const int s = int(i / hkv), h = int(i % hkv);
    if (!FlushItem(params, works[s], configs[s], arena, h)) {
      int64_t expected = -1;
      bad.compare_exchange_strong(expected, s);
    }
  });
  if (bad.load() >= 0)
    return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(bad.load()) +
                                                     ": a flushed key or value is not finite or beyond fp16 range");
  ParallelFor(int64_t(num_seqs) * hkv, threads, [&](int64_t i, int) {
    const int s = int(i / hkv), h = int(i % hkv);
    AppendItem(params, works[s], configs[s], arena, h);
  });
  return Result::Ok();
}

}  // namespace

Result CpuQuantizeAppend(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                         int num_seqs, uint8_t* arena, int threads) {
  const std::string e = CheckStep(params, works, configs, num_seqs, arena, 0);
  if (!e.empty()) return Result::Error(Code::kInvalidArgument, e);
  return QuantizeAppendChecked(params, works, configs, num_seqs, arena, threads);
}

void CpuAttention(const StepParams& params, const SeqWork* works, const QuantConfig* configs, int num_seqs,
                  const uint8_t* arena, int threads) {
  const int hkv = params.num_kv_heads, hq = params.num_q_heads, d = params.head_dim;
  const int g = hq / hkv;
  const int qblk = std::max(1, kMaxRows / g);
  const int nthreads = std::max(1, threads > 0 ? threads : int(std::thread::hardware_concurrency()));
  constexpr int32_t kEnd = std::numeric_limits<int32_t>::max();
  std::vector<AttnItem> items;
  for (int s = 0; s < num_seqs; ++s)
    for (int h = 0; h < hkv; ++h)
      for (int32_t q0 = 0; q0 < works[s].n_new; q0 += qblk)
        items.push_back({s, h, q0, std::min(works[s].n_new, q0 + qblk), 0, kEnd, -1});
  // Split-KV when there are too few items to keep every thread busy (decode of few sequences):
  // each long item is cut into token chunks (multiples of kSplitTokens) that write partial
  // (m, l, acc) states, merged below. Edge cases: a chunk a row does not reach leaves m = -inf,
  // l = 0 and contributes nothing; chunk 0 always holds token 0, which every row sees.
  constexpr int32_t kSplitTokens = 512;
  std::vector<AttnItem> run;
  struct Merge {
    AttnItem item;
    int64_t first;
    int count;
  };
  std::vector<Merge> merges;
  const int64_t want = 4 * int64_t(nthreads);
  Partials partials;
  // Slot rows: those of the largest item (g itself when g > kMaxRows; g for a decode batch, whose
  // slots are then no larger than before the items grew).
  for (const AttnItem& it : items) partials.max_rows = std::max(partials.max_rows, (it.q1 - it.q0) * g);
  partials.d = d;
  int64_t nslots = 0;
  for (const AttnItem& it : items) {
    const SeqInfo si = MakeSeqInfo(params, works[it.seq], configs[it.seq]);
    const int32_t t_need = si.length - works[it.seq].n_new + it.q1;  // tokens the last row sees
    int splits = 1;
    if (int64_t(items.size()) < want) {
      splits = int(std::min<int64_t>((want + int64_t(items.size()) - 1) / int64_t(items.size()),
                                     (t_need + kSplitTokens - 1) / kSplitTokens));
      splits = std::max(1, splits);
    }
    if (splits == 1) {
      run.push_back(it);
      continue;
    }
    const int32_t chunk = ((t_need + splits - 1) / splits + kTile - 1) / kTile * kTile;
    Merge mg{it, nslots, 0};
    for (int32_t lo = 0; lo < t_need; lo += chunk) {
      AttnItem part = it;
      part.t_lo = lo;
      part.t_hi = std::min(t_need, lo + chunk);
      part.partial = nslots++;
      run.push_back(part);
      ++mg.count;
    }
    merges.push_back(mg);
  }
  partials.data.resize(size_t(nslots) * size_t(partials.max_rows) * size_t(d + 2));
  std::vector<Scratch> scratch(static_cast<size_t>(nthreads));
  ParallelFor(int64_t(run.size()), nthreads, [&](int64_t i, int tid) {
    const AttnItem& it = run[size_t(i)];
    AttentionItem(params, works[it.seq], configs[it.seq], arena, it, scratch[size_t(tid)], &partials);
  });
  uint16_t* out = static_cast<uint16_t*>(params.o);
  std::vector<float> acc(static_cast<size_t>(d));
  for (const Merge& mg : merges) {
    const SeqWork& w = works[mg.item.seq];
    const int rows = (mg.item.q1 - mg.item.q0) * g;
    for (int r = 0; r < rows; ++r) {
      float m = -std::numeric_limits<float>::infinity();
      for (int c = 0; c < mg.count; ++c) m = std::max(m, partials.slot(mg.first + c)[size_t(r) * size_t(d + 2)]);
      float l = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int c = 0; c < mg.count; ++c) {
        const float* row = partials.slot(mg.first + c) + size_t(r) * size_t(d + 2);
        if (row[1] == 0.f) continue;
        const float f = std::exp(row[0] - m);
        l += row[1] * f;
        for (int x = 0; x < d; ++x) acc[size_t(x)] += row[2 + x] * f;
      }
      const int qi = mg.item.q0 + r / g;
      const int head = mg.item.h * g + r % g;
      uint16_t* dst = out + ((w.q_row + qi) * hq + head) * d;
      const float inv = 1.f / l;
      for (int x = 0; x < d; ++x) dst[x] = StoreAct(acc[size_t(x)] * inv, params.dtype);
    }
  }
}

Result CpuRunStep(const StepParams& params, const SeqWork* works, const QuantConfig* configs, int num_seqs,
                  uint8_t* arena, int threads) {
  const std::string e = CheckStep(params, works, configs, num_seqs, arena);  // n_new >= 1: attention follows
  if (!e.empty()) return Result::Error(Code::kInvalidArgument, e);
  Result r = QuantizeAppendChecked(params, works, configs, num_seqs, arena, threads);
  if (!r.ok()) return r;
  CpuAttention(params, works, configs, num_seqs, arena, threads);
  return Result::Ok();
}

}  // namespace kvq
