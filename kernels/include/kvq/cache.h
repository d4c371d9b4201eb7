// Per-session, per-layer cache metadata and the plain work description that the CPU reference
// and the CUDA kernels execute. Host code plans (positions, flushes, pages); kernels only read and
// write the arena at the offsets they are given and never allocate.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvq/format.h"

namespace kvq {

// Minimal status for the compute library (no Abseil here). The store maps codes to gRPC codes.
enum class Code : uint8_t { kOk = 0, kInvalidArgument, kFailedPrecondition, kResourceExhausted, kInternal };
struct Result {
  Code code = Code::kOk;
  std::string message;
  bool ok() const { return code == Code::kOk; }
  static Result Ok() { return {}; }
  static Result Error(Code c, std::string m) { return {c, std::move(m)}; }
};

// Fixed-size byte pages from one arena (host memory for the CPU backend, one cudaMalloc for CUDA).
// Offsets are bytes from the arena base and 16-byte aligned.
class PageAllocator {
 public:
  virtual ~PageAllocator() = default;
  // Returns false when the pool (or the caller's quota) cannot give `bytes` more.
  virtual bool Allocate(int64_t bytes, int64_t* offset) = 0;
  virtual void Free(int64_t offset, int64_t bytes) = 0;
};

// One tensor (K or V) of one layer of one session, as the kernels see it at the start of a step.
struct StreamView {
  int32_t body_len = 0;            // quantized tokens (after the sink)
  int32_t win_len = 0;             // full-precision window tokens (after the body)
  int32_t win_first = 0;           // slot of the first window token in win_pages[0], < kPageTokens
  const int64_t* body_pages = nullptr;  // arena offsets; covers body_len + flush tokens
  const int64_t* win_pages = nullptr;   // arena offsets; covers win_first + win_len + appended
  int32_t num_body_pages = 0;
  int32_t num_win_pages = 0;
  int64_t sink_page = -1;          // [Hkv][kPageTokens][D] page, -1 when the config has no sink
};

// One sequence's work in a batched step of one layer. The state is the state at the start of
// the step, after any truncation. The step does, in order:
//   1. flush: the oldest flush_k (flush_v) window tokens of K (V) are quantized into body tokens
//      [body_len, body_len + flush); if compute_norm, the key-norm factors are first computed from
//      the flushed keys (max |k| per channel) and written at norm_offset; flushed keys are
//      quantized as k / f when key_norm is on.
//   2. append: the n_new new tokens (rows kv_row .. kv_row + n_new of the k/v inputs) go to sink
//      slots sink_len .. S-1 first, then to the window after its (post-flush) last token.
//   3. attention: query rows q_row .. q_row + n_new - 1 at absolute positions
//      length - n_new + i (length after append), each attending to tokens 0 .. its position,
//      over sink (full precision), K/V bodies (quantized) and windows (full precision).
struct SeqWork {
  int32_t sink_len = 0;
  StreamView k, v;
  int32_t flush_k = 0;
  int32_t flush_v = 0;
  // The flush (and the key-norm factors it computes) was already written by a flush-only step
  // (n_new = 0) on this same state after the previous step's attention (LayerCache::PlanFlushAfter;
  // the CUDA runner's RunStep flush_after): its body slots and the key-norm factors hold
  // exactly what this flush would write, so the step skips it (the CPU reference too).
  bool flush_done = false;
  bool compute_norm = false;
  int64_t norm_offset = -1;        // float [Hkv][D] key-norm factors in the arena, -1 when off
  int32_t n_new = 0;
  int64_t kv_row = 0;              // first row of this sequence in k_new / v_new
  int64_t q_row = 0;               // first row of this sequence in q / o
};

// A batched step of one layer: every sequence shares the model shape and dtype; each may have
// its own config (presets differ per session), given by configs[i].
struct StepParams {
  int num_q_heads = 0;             // Hq, a multiple of Hkv
  int num_kv_heads = 0;            // Hkv
  int head_dim = 0;                // D
  DType dtype = DType::kF16;
  float softmax_scale = 0.f;       // 0 means 1/sqrt(D)
  const void* q = nullptr;         // [rows, Hq, D]
  const void* k_new = nullptr;     // [rows, Hkv, D]
  const void* v_new = nullptr;     // [rows, Hkv, D]
  void* o = nullptr;               // [rows, Hq, D]
};

// Bytes a layer cache holds, by kind (honest: page slack included in the page kinds).
struct CacheBytes {
  int64_t codes = 0;          // quantized body pages: code words
  int64_t scales = 0;         // quantized body pages: scales and zeros
  int64_t full_precision = 0; // sink and window pages
  int64_t metadata = 0;       // key-norm factors
  int64_t total() const { return codes + scales + full_precision + metadata; }
};

// Host-side state of one tensor stream.
struct StreamState {
  int32_t body_len = 0;
  int32_t win_len = 0;
  int32_t win_first = 0;
  std::vector<int64_t> body_pages;
  std::vector<int64_t> win_pages;
  int64_t sink_page = -1;
};

// Planned step: the work for the kernels plus what Commit/Abort need. Owns the page arrays the
// SeqWork points into, so it must outlive the kernel call (moving it keeps them valid; copying
// it does not: the copy's work still points into the original).
struct StepPlan {
  SeqWork work;
  StreamState k_next, v_next;     // state after the step (for Commit)
  int32_t sink_next = 0;
  bool norm_ready_next = false;
  std::vector<int64_t> k_body, v_body, k_win, v_win;  // page arrays for `work`
  std::vector<int64_t> new_pages; std::vector<int64_t> new_page_bytes;    // freed on Abort
  std::vector<int64_t> dead_pages; std::vector<int64_t> dead_page_bytes;  // freed on Commit
};

// Metadata of one layer of one session. Not thread-safe: the store serializes steps per session.
class LayerCache {
 public:
  explicit LayerCache(const CacheShape& shape);
  ~LayerCache() = default;
  LayerCache(const LayerCache&) = delete;
  LayerCache& operator=(const LayerCache&) = delete;
  LayerCache(LayerCache&&) = default;

  const CacheShape& shape() const { return shape_; }
  int32_t length() const;
  // Smallest position a step may start at (truncation stays inside full precision).
  int32_t min_position() const;

  // Plans a step appending n >= 1 tokens at `position` (== length appends; min_position() <=
  // position < length truncates back to position first; anything else kFailedPrecondition naming
  // the current length). Applies the pending flush policy, allocates the pages the step needs.
  // Changes nothing in this object; on error allocates nothing. An invalid shape or config
  // (ValidateShape) gives kInvalidArgument for every step.
  Result Plan(int32_t position, int32_t n, PageAllocator& alloc, StepPlan* plan) const;
  // Applies a planned step after the kernels succeeded; frees pages the step emptied.
  void Commit(StepPlan* plan, PageAllocator& alloc);

  // The flush after a step's attention (the spec's order: attention, then quantization): the
  // pending flush of the state after `step` as a flush-only batch (work.n_new = 0), with the body
  // pages (and the key-norm factors' page) it writes allocated now. A backend runs it after the
  // step's attention; after Commit(step), CommitFlushAfter records that those codes are written,
  // and the next Plan at the current length marks its flush done (SeqWork::flush_done) instead of
  // planning it again. The counts stay pending: a truncating step (or a step after an aborted
  // flush) flushes again, into the same pages. Always fills `flush` with a valid flush-only work
  // (no flush when the state has none pending, or on error); on error (the pool or the quota)
  // holds no pages. Changes nothing in this object.
  Result PlanFlushAfter(const StepPlan& step, PageAllocator& alloc, StepPlan* flush) const;
  // After Commit(step) of the step it was planned on, once the flush ran.
  void CommitFlushAfter(StepPlan* flush);
  // Whether the pending flush of the committed state is written (the next step at length() skips it).
  bool flush_written() const { return flush_written_; }
  // Drops a planned step (kernel failure or cancelled entry): frees the pages it allocated.
  // A step that failed inside CpuRunStep wrote nothing the committed state reads (flushes go to
  // new body slots, appends run only after every flush succeeded). A truncating step whose kernel
  // SUCCEEDED but which is aborted anyway has overwritten window slots at positions >= its
  // position: the next step for this cache must then start at or before that position.
  static void Abort(StepPlan* plan, PageAllocator& alloc);
  // Frees every page.
  void Release(PageAllocator& alloc);

  CacheBytes bytes() const;
  int32_t sink_len() const { return sink_len_; }
  const StreamState& k() const { return k_; }
  const StreamState& v() const { return v_; }
  bool norm_ready() const { return norm_ready_; }
  int64_t norm_offset() const { return norm_offset_; }

 private:
  CacheShape shape_;
  StreamLayout k_layout_, v_layout_;
  std::string shape_error_;  // ValidateShape(shape_): Plan refuses every step of an invalid shape
  int32_t sink_len_ = 0;
  StreamState k_, v_;
  bool norm_ready_ = false;
  int64_t norm_offset_ = -1;  // allocated by the first step that computes them (ready or not)
  bool flush_written_ = false;  // CommitFlushAfter: the pending flush's codes are in the body pages
};

}  // namespace kvq
