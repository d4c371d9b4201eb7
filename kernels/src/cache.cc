#include "kvq/cache.h"

#include <algorithm>
#include <string>
#include <utility>

#include "kvq/format.h"

namespace kvq {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tokens the flush policy quantizes from a window of `win_len` tokens: while the window holds
// at least keep + F tokens, the oldest F go to the body.
int32_t FlushCount(const TensorFormat& f, int32_t win_len) {
  if (!f.quantized() || win_len < f.keep + f.flush) return 0;
  return (win_len - f.keep) / f.flush * f.flush;
}

// Window pages in use for a window of win_len tokens starting at slot win_first.
int64_t WindowPages(int32_t win_first, int32_t win_len) {
  return win_len == 0 ? 0 : CeilDiv(int64_t{win_first} + win_len, kPageTokens);
}

// A plan's page allocation, all or nothing: after the first refusal nothing more is asked for;
// every page taken is recorded in the plan (LayerCache::Abort frees them).
class PlanPages {
 public:
  PlanPages(PageAllocator& alloc, StepPlan* plan) : alloc_(alloc), plan_(*plan) {}
  bool ok() const { return ok_; }
  void Take(int64_t bytes, int64_t* off) {
    if (!ok_) return;
    if (!alloc_.Allocate(bytes, off)) {
      ok_ = false;
      return;
    }
    plan_.new_pages.push_back(*off);
    plan_.new_page_bytes.push_back(bytes);
  }
  // Appends pages of `bytes` until `pages` has `need`.
  void Cover(int64_t need, int64_t bytes, std::vector<int64_t>* pages) {
    while (ok_ && int64_t(pages->size()) < need) {
      int64_t off = -1;
      Take(bytes, &off);
      if (ok_) pages->push_back(off);
    }
  }

 private:
  PageAllocator& alloc_;
  StepPlan& plan_;
  bool ok_ = true;
};

// The key-norm factors of a layer: float [Hkv][D].
int64_t NormBytes(const CacheShape& shape) { return AlignUp16(int64_t{shape.num_kv_heads} * shape.head_dim * 4); }

// A step's view of one stream: its state and the page arrays (owned by the StepPlan) it covers.
void FillView(const StreamState& s, const std::vector<int64_t>& body, const std::vector<int64_t>& win, StreamView* v) {
  v->body_len = s.body_len;
  v->win_len = s.win_len;
  v->win_first = s.win_first;
  v->body_pages = body.data();
  v->win_pages = win.data();
  v->num_body_pages = int32_t(body.size());
  v->num_win_pages = int32_t(win.size());
  v->sink_page = s.sink_page;
}

}  // namespace

LayerCache::LayerCache(const CacheShape& shape)
    : shape_(shape),
      k_layout_(MakeStreamLayout(shape.config.k, shape.num_kv_heads, shape.head_dim)),
      v_layout_(MakeStreamLayout(shape.config.v, shape.num_kv_heads, shape.head_dim)),
      shape_error_(ValidateShape(shape)) {}

int32_t LayerCache::length() const { return sink_len_ + k_.body_len + k_.win_len; }

int32_t LayerCache::min_position() const {
  if (k_.body_len == 0 && v_.body_len == 0) return 0;
  return sink_len_ + std::max(k_.body_len, v_.body_len);
}

Result LayerCache::Plan(int32_t position, int32_t n, PageAllocator& alloc, StepPlan* plan) const {
  const QuantConfig& cfg = shape_.config;
  const int32_t len = length();
  if (!shape_error_.empty()) return Result::Error(Code::kInvalidArgument, "invalid cache shape: " + shape_error_);
  if (n < 1) return Result::Error(Code::kInvalidArgument, "a step needs n >= 1 new tokens, got " + std::to_string(n));
  if (position < min_position() || position > len) {
    return Result::Error(Code::kFailedPrecondition,
                         "position " + std::to_string(position) + " is not appendable: the cache length is " +
                             std::to_string(len) + " (a step may start at " + std::to_string(min_position()) +
                             " .. " + std::to_string(len) + ")");
  }
  if (int64_t{position} + n > (int64_t{1} << 30))
    return Result::Error(Code::kInvalidArgument, "position + n exceeds 2^30 tokens");

  *plan = StepPlan();
  StepPlan& p = *plan;
  int32_t sink = sink_len_;
  StreamState k = k_, v = v_;

  // 1. Truncation back to `position` (stays inside full precision: sink or windows).
  if (position < len) {
    if (position < sink) sink = position;  // only when both bodies are empty
    for (StreamState* s : {&k, &v}) {
      s->win_len = position - sink - s->body_len;
      const int64_t keep_pages = WindowPages(s->win_first, s->win_len);
      for (int64_t i = keep_pages; i < int64_t(s->win_pages.size()); ++i) {
        p.dead_pages.push_back(s->win_pages[size_t(i)]);
        p.dead_page_bytes.push_back(k_layout_.fp_page_bytes);
      }
      s->win_pages.resize(size_t(keep_pages));
      if (s->win_len == 0) s->win_first = 0;
    }
  }

  // 2. The pending flush policy of the previous step.
  const int32_t flush_k = FlushCount(cfg.k, k.win_len);
  const int32_t flush_v = FlushCount(cfg.v, v.win_len);

  // 3. The append: sink slots first, then the windows.
  const int32_t n_sink = cfg.sink > 0 ? std::min(n, cfg.sink - sink) : 0;
  const int32_t n_win = n - n_sink;

  // Allocation, all or nothing.
  PlanPages pages(alloc, &p);
  const int64_t fp_bytes = k_layout_.fp_page_bytes;
  if (cfg.sink > 0) {
    if (k.sink_page < 0) pages.Take(fp_bytes, &k.sink_page);
    if (v.sink_page < 0) pages.Take(fp_bytes, &v.sink_page);
  }
  bool compute_norm = false;
  int64_t norm_offset = norm_offset_;
  if (cfg.key_norm && !norm_ready_ && flush_k > 0) {
    compute_norm = true;
    if (norm_offset < 0) pages.Take(NormBytes(shape_), &norm_offset);
  }
  struct Sched {
    StreamState* s;
    const StreamLayout* layout;
    int32_t flush;
    std::vector<int64_t>* body;
    std::vector<int64_t>* win;
  };
  const Sched scheds[2] = {{&k, &k_layout_, flush_k, &p.k_body, &p.k_win},
                           {&v, &v_layout_, flush_v, &p.v_body, &p.v_win}};
  for (const Sched& sc : scheds) {
    StreamState& s = *sc.s;
    *sc.body = s.body_pages;
    pages.Cover(CeilDiv(int64_t{s.body_len} + sc.flush, kPageTokens), sc.layout->quant_page_bytes, sc.body);
    *sc.win = s.win_pages;
    const int64_t total = int64_t{s.win_first} + s.win_len + n_win;
    const int64_t win_need = (s.win_len + n_win == 0) ? int64_t(sc.win->size()) : CeilDiv(total, kPageTokens);
    pages.Cover(win_need, fp_bytes, sc.win);
  }
  if (!pages.ok()) {
    Abort(plan, alloc);
    *plan = StepPlan();
    return Result::Error(Code::kResourceExhausted, "the page pool cannot hold this step's pages");
  }

  // The work description (state at the start of the step, after truncation).
  SeqWork& w = p.work;
  w.sink_len = sink;
  FillView(*scheds[0].s, *scheds[0].body, *scheds[0].win, &w.k);
  FillView(*scheds[1].s, *scheds[1].body, *scheds[1].win, &w.v);
  w.flush_k = flush_k;
  w.flush_v = flush_v;
  // written after the previous step's attention, on this very state (no truncation since)
  w.flush_done = flush_written_ && position == len && (flush_k > 0 || flush_v > 0);
  w.compute_norm = compute_norm;
  w.norm_offset = cfg.key_norm ? norm_offset : -1;
  w.n_new = n;

  // The state after the step.
  p.sink_next = sink + n_sink;
  p.norm_ready_next = norm_ready_ || compute_norm;
  StreamState* nexts[2] = {&p.k_next, &p.v_next};
  for (int i = 0; i < 2; ++i) {
    const Sched& sc = scheds[i];
    StreamState& nx = *nexts[i];
    nx.sink_page = sc.s->sink_page;
    nx.body_pages = *sc.body;
    nx.body_len = sc.s->body_len + sc.flush;
    nx.win_len = sc.s->win_len - sc.flush + n_win;
    int64_t first = int64_t{sc.s->win_first} + sc.flush;
    size_t drop = size_t(first / kPageTokens);
    if (nx.win_len == 0) {
      drop = sc.win->size();
      first = 0;
    }
    drop = std::min(drop, sc.win->size());
    for (size_t j = 0; j < drop; ++j) {
      p.dead_pages.push_back((*sc.win)[j]);
      p.dead_page_bytes.push_back(fp_bytes);
    }
    nx.win_pages.assign(sc.win->begin() + std::ptrdiff_t(drop), sc.win->end());
    nx.win_first = int32_t(first % kPageTokens);
  }
  return Result::Ok();
}

void LayerCache::Commit(StepPlan* plan, PageAllocator& alloc) {
  sink_len_ = plan->sink_next;
  k_ = plan->k_next;
  v_ = plan->v_next;
  flush_written_ = false;  // a new state, a new pending flush
  if (plan->norm_ready_next && !norm_ready_) {
    norm_ready_ = true;
    norm_offset_ = plan->work.norm_offset;
  }
  for (size_t i = 0; i < plan->dead_pages.size(); ++i) alloc.Free(plan->dead_pages[i], plan->dead_page_bytes[i]);
  plan->dead_pages.clear();
  plan->dead_page_bytes.clear();
  plan->new_pages.clear();  // now owned by the cache
  plan->new_page_bytes.clear();
}

Result LayerCache::PlanFlushAfter(const StepPlan& step, PageAllocator& alloc, StepPlan* flush) const {
  const QuantConfig& cfg = shape_.config;
  *flush = StepPlan();
  StepPlan& f = *flush;
  f.k_next = step.k_next;
  f.v_next = step.v_next;
  f.sink_next = step.sink_next;
  f.norm_ready_next = step.norm_ready_next;
  const int32_t flush_k = FlushCount(cfg.k, f.k_next.win_len);
  const int32_t flush_v = FlushCount(cfg.v, f.v_next.win_len);
  // the factors' page of the state after the step (the step's, when key_norm is on)
  int64_t norm_offset = cfg.key_norm ? step.work.norm_offset : -1;
  const bool compute_norm = cfg.key_norm && !f.norm_ready_next && flush_k > 0;
  PlanPages pages(alloc, &f);
  if (compute_norm && norm_offset < 0) pages.Take(NormBytes(shape_), &norm_offset);
  pages.Cover(CeilDiv(int64_t{f.k_next.body_len} + flush_k, kPageTokens), k_layout_.quant_page_bytes,
              &f.k_next.body_pages);
  pages.Cover(CeilDiv(int64_t{f.v_next.body_len} + flush_v, kPageTokens), v_layout_.quant_page_bytes,
              &f.v_next.body_pages);
  Result r = Result::Ok();
  SeqWork& w = f.work;
  if (!pages.ok()) {  // nothing held, no flush: the next step plans it as usual
    Abort(flush, alloc);
    f.k_next.body_pages = step.k_next.body_pages;
    f.v_next.body_pages = step.v_next.body_pages;
    norm_offset = cfg.key_norm ? step.work.norm_offset : -1;
    r = Result::Error(Code::kResourceExhausted, "the page pool cannot hold the flush after the step");
  } else {
    w.flush_k = flush_k;
    w.flush_v = flush_v;
    w.compute_norm = compute_norm;
  }
  f.k_body = f.k_next.body_pages;
  f.v_body = f.v_next.body_pages;
  f.k_win = f.k_next.win_pages;
  f.v_win = f.v_next.win_pages;
  w.sink_len = f.sink_next;
  FillView(f.k_next, f.k_body, f.k_win, &w.k);
  FillView(f.v_next, f.v_body, f.v_win, &w.v);
  w.norm_offset = norm_offset;
  w.n_new = 0;
  return r;
}

void LayerCache::CommitFlushAfter(StepPlan* flush) {
  k_.body_pages = flush->k_next.body_pages;
  v_.body_pages = flush->v_next.body_pages;
  if (flush->work.compute_norm) norm_offset_ = flush->work.norm_offset;  // written; ready once flushed
  flush_written_ = flush->work.flush_k > 0 || flush->work.flush_v > 0;
  flush->new_pages.clear();  // now owned by the cache
  flush->new_page_bytes.clear();
}

void LayerCache::Abort(StepPlan* plan, PageAllocator& alloc) {
  for (size_t i = 0; i < plan->new_pages.size(); ++i) alloc.Free(plan->new_pages[i], plan->new_page_bytes[i]);
  plan->new_pages.clear();
  plan->new_page_bytes.clear();
  plan->dead_pages.clear();
  plan->dead_page_bytes.clear();
}

void LayerCache::Release(PageAllocator& alloc) {
  const int64_t fp = k_layout_.fp_page_bytes;
  const std::pair<StreamState*, const StreamLayout*> streams[2] = {{&k_, &k_layout_}, {&v_, &v_layout_}};
  for (const auto& st : streams) {
    StreamState& s = *st.first;
    for (int64_t off : s.body_pages) alloc.Free(off, st.second->quant_page_bytes);
    for (int64_t off : s.win_pages) alloc.Free(off, fp);
    if (s.sink_page >= 0) alloc.Free(s.sink_page, fp);
    s = StreamState();
  }
  if (norm_offset_ >= 0) alloc.Free(norm_offset_, NormBytes(shape_));
  norm_offset_ = -1;
  norm_ready_ = false;
  sink_len_ = 0;
}

CacheBytes LayerCache::bytes() const {
  CacheBytes b;
  const int64_t hkv = shape_.num_kv_heads;
  const std::pair<const StreamState*, const StreamLayout*> streams[2] = {{&k_, &k_layout_}, {&v_, &v_layout_}};
  for (const auto& st : streams) {
    const StreamState& s = *st.first;
    const StreamLayout& l = *st.second;
    const int64_t pages = int64_t(s.body_pages.size());
    b.codes += pages * hkv * l.scales_offset;
    b.scales += pages * (l.quant_page_bytes - hkv * l.scales_offset);
    b.full_precision += (int64_t(s.win_pages.size()) + (s.sink_page >= 0 ? 1 : 0)) * l.fp_page_bytes;
  }
  if (norm_offset_ >= 0) b.metadata += NormBytes(shape_);
  return b;
}

}  // namespace kvq
