// CudaStepRunner: validation, flattening of a batch into one device buffer, split-KV planning and
// the launches. Host code only; the kernels live in the .cu files.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kvq/cuda_ops.h"
#include "step_desc.h"

namespace kvq {

#define KVQ_CUDA_RETURN(expr)                                                                   \
  do {                                                                                          \
    const cudaError_t kvq_err_ = (expr);                                                        \
    if (kvq_err_ != cudaSuccess) return CudaError(kvq_err_, #expr);                             \
  } while (0)

#define KVQ_RETURN_IF_ERROR(expr)   \
  do {                              \
    Result kvq_r_ = (expr);         \
    if (!kvq_r_.ok()) return kvq_r_; \
  } while (0)

namespace {

Result CudaError(cudaError_t e, const char* what) {
  (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  const Code code = e == cudaErrorMemoryAllocation ? Code::kResourceExhausted : Code::kInternal;
  return Result::Error(code, std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) +
                                 " (" + cudaGetErrorString(e) + ")");
}

int64_t Align16(int64_t x) { return (x + 15) & ~int64_t{15}; }

std::string SupportsTensor(const TensorFormat& f, const char* name) {
  if (!f.quantized()) return "";
  if (f.bits != 2 && f.bits != 3 && f.bits != 4)
    return std::string(name) + ": the CUDA kernels support 2, 3 and 4 bits, not " + std::to_string(f.bits);
  return "";
}

}  // namespace

std::string CudaSupports(const StepParams& params, const QuantConfig* configs, int num_seqs) {
  if (params.head_dim != 64 && params.head_dim != 128)
    return "the CUDA kernels support head_dim 64 and 128, not " + std::to_string(params.head_dim);
  if (params.dtype != DType::kF16 && params.dtype != DType::kBF16) return "dtype must be fp16 or bf16";
  if (params.num_kv_heads < 1 || params.num_q_heads < params.num_kv_heads ||
      params.num_q_heads % params.num_kv_heads != 0)
    return "num_q_heads must be a positive multiple of num_kv_heads";
  if (num_seqs < 0) return "negative batch size";
  for (int i = 0; i < num_seqs; ++i) {
    const std::string e = ValidateConfig(configs[i], params.head_dim);
    if (!e.empty()) return "sequence " + std::to_string(i) + ": " + e;
    std::string t = SupportsTensor(configs[i].k, "k");
    if (t.empty()) t = SupportsTensor(configs[i].v, "v");
    if (!t.empty()) return "sequence " + std::to_string(i) + ": " + t;
  }
  return "";
}

namespace {

// The decode fast path (decode.cuh) covers: every sequence with at most kRowsPerUnit query rows
// (n_new * Hq/Hkv) so one unit holds all rows of its KV head, every quantized tensor grouped by
// G = 32 with 2-4 bits (a token's along_channels groups and an aligned 32-token along_tokens
// tile are one group each), and a sink of a multiple of 32 tokens (the body, hence every
// along_tokens group, starts on a 32-token tile boundary). Everything else takes the generic kernel.
bool DecodeFastPathFits(const StepParams& p, const SeqWork* works, const QuantConfig* configs, int num_seqs) {
  const int g = p.num_q_heads / p.num_kv_heads;
  for (int i = 0; i < num_seqs; ++i) {
    if (int64_t{works[i].n_new} * g > cuda::kRowsPerUnit) return false;
    const QuantConfig& c = configs[i];
    if (c.sink % cuda::kTileTokens != 0) return false;
    for (const TensorFormat* f : {&c.k, &c.v}) {
      if (!f->quantized()) continue;
      if (f->group_size != 32 || f->bits < 2 || f->bits > 4) return false;
    }
  }
  return true;
}

// KIVI tensor-core units: the least tokens per unit (at 2 blocks per SM) that pays for them.
constexpr int kKiviMmaMinUnitTokens = 1024;

// The decode kernel's code paths the batch needs (kDecodePath* bits of step_desc.h).
int DecodePaths(const QuantConfig* configs, int num_seqs) {
  int paths = 0;
  for (int i = 0; i < num_seqs; ++i) {
    const QuantConfig& c = configs[i];
    if (c.k.quantized())
      paths |= c.k.grouping == Grouping::kAlongTokens ? cuda::kDecodePathKTok : cuda::kDecodePathKCh;
    if (c.v.quantized())
      paths |= c.v.grouping == Grouping::kAlongTokens ? cuda::kDecodePathVTok : cuda::kDecodePathVCh;
  }
  return paths;
}

}  // namespace

// A run of an item's visible tokens that becomes units of one kind (PrepareImpl's split plan).
struct Segment {
  int64_t begin, end;
  int32_t kind;
  int64_t skip_begin, skip_end;  // kUnitTokens around a body: one unit, never split
};

// Every item's segments in one flat list, item k's at [off[k], off[k + 1]): no allocation per item
// and step (a batch of 64 sequences with 8 KV heads has 512 items).
struct SegmentLists {
  std::vector<Segment> all;
  std::vector<int64_t> off{0};
  void Clear() {
    all.clear();
    off.assign(1, 0);
  }
  void EndItem() { off.push_back(static_cast<int64_t>(all.size())); }
  const Segment* begin(size_t k) const { return all.data() + off[k]; }
  const Segment* end(size_t k) const { return all.data() + off[k + 1]; }
};

struct CudaStepRunner::Impl {
  int device = 0;
  int num_sms = 0;
  int blocks_per_sm = 0;  // the prepared decode launch's resident blocks per SM (plan)
  bool pdl = true;        // the prepared attention launches as a programmatic dependent (set_pdl)
  // Pinned staging and its device copy (grown on demand, after the previous use finished).
  uint8_t* staging = nullptr;
  uint8_t* meta = nullptr;
  int64_t meta_cap = 0;
  float* part_o = nullptr;
  float* part_ml = nullptr;
  int64_t units_cap = 0;
  // The kernels' error flag heads the step's output region: out_dev = [flag | o of RunStepFromHost
  // from kOutOffset], so that one copy brings both back (out_host, pinned, the same layout).
  static constexpr int64_t kOutOffset = 256;
  uint8_t* out_dev = nullptr;
  uint8_t* out_host = nullptr;
  int64_t out_cap = 0;
  int32_t* error_flag = nullptr;  // = out_dev
  // The flag the launches set: error_flag, or inside a mapped RunStepFromHost the head of out_host.
  int32_t* launch_flag = nullptr;
  int32_t* flag() const { return launch_flag ? launch_flag : error_flag; }
  int32_t* error_host = nullptr;
  int32_t* merge_count = nullptr;  // decode path's fused merge: one counter per item, zero between launches
  // The fused step's claims and done marks per (sequence, KV head) (AttnArgs::item_sync) and the
  // last launch's epoch (never 0: the marks start at 0).
  uint32_t* item_sync = nullptr;
  int64_t item_sync_cap = 0;
  uint32_t epoch = 0;
  cudaStream_t fused_stream = nullptr;  // the stream of the last fused launch
  bool fused_launched = false;
  bool fused = false;  // the prepared step runs the quantize-append inside the attention launch
  // The flush after the attention (Prepare's flush_after): its batch, launched after the step
  // (flush_after) unless the step is fused or it flushes nothing.
  bool flush_after = false;
  bool flush_prepared = false;    // a flush-after batch with something to flush is in meta
  cuda::QaPlan flush_plan;        // its launch's grid
  const cuda::DevSeq* d_fseqs = nullptr;
  const int64_t* d_fpages = nullptr;
  const cuda::DevFirstPage* d_first_pages = nullptr;  // [units] or null (set_early_pages)
  const cuda::DevQaHead* d_heads = nullptr;   // [seqs][2] where qa_plan.head, else null
  const cuda::DevQaHead* d_fheads = nullptr;  // the same for the flush after the attention
  int64_t merge_cap = 0;
  cudaEvent_t done = nullptr;  // recorded after the last launch that used staging/meta/workspace
  bool done_recorded = false;
  // RunStepFromHost synchronizes its stream at the end: inside it the records are held back
  // (MarkBusy), one record then stands for them where it returns early, none where the
  // synchronization covered them (three fewer API calls per step).
  std::vector<std::pair<int64_t, int64_t>> sections;  // the last Prepare's (offset, bytes) in staging
  // The plan's scratch, kept between steps so that a step allocates nothing on the host.
  std::vector<cuda::DevSeq> seqs, fseqs;
  std::vector<int64_t> pages, fpages;
  std::vector<cuda::DevFirstPage> first_pages;
  std::vector<cuda::DevQaHead> heads, fheads;
  std::vector<cuda::DevMergeItem> items;
  std::vector<cuda::DevUnit> units, units_ordered;
  SegmentLists segments, split;
  std::vector<char> owned;
  std::vector<std::pair<int64_t, int64_t>> length_runs;
  bool hold_records = false;
  cudaStream_t held_stream = nullptr;
  bool held = false;

  // `done` marks the end of the work just enqueued on `stream` (WaitIdle, and the fused launch's
  // wait on another stream, wait for it).
  Result MarkBusy(cudaStream_t stream) {
    if (hold_records) {
      held = true;
      held_stream = stream;
      return Result::Ok();
    }
    KVQ_CUDA_RETURN(cudaEventRecord(done, stream));
    done_recorded = true;
    return Result::Ok();
  }

  // The prepared batch.
  StepParams params;
  int num_seqs = 0;
  int num_units = 0;
  int num_items = 0;
  int chunk = 0;
  bool decode_path = false;
  bool mma_tiles = false;  // the launch asks for MmaTokTiles (AttnArgs::mma_tiles)
  int max_rows = 0;
  int decode_paths = 0;
  int ring_slot_bytes = 0;
  int ring_work_bytes = 0;
  int ring_stages = 2;
  const cuda::DevSeq* d_seqs = nullptr;
  const int64_t* d_pages = nullptr;
  const cuda::DevUnit* d_units = nullptr;
  const cuda::DevMergeItem* d_items = nullptr;
  bool prepared = false;
  bool attention_ready = false;  // every sequence has n_new >= 1
  cuda::QaPlan qa_plan;          // the quantize-append's grid (its chunks: the fused step's)

  ~Impl() {
    if (done) cudaEventSynchronize(done);
    cudaFreeHost(staging);
    cudaFree(meta);
    cudaFree(part_o);
    cudaFree(part_ml);
    cudaFree(out_dev);
    cudaFreeHost(out_host);
    cudaFree(item_sync);
    cudaFreeHost(error_host);
    cudaFree(merge_count);
    if (done) cudaEventDestroy(done);
  }

  Result WaitIdle() {
    if (done_recorded) KVQ_CUDA_RETURN(cudaEventSynchronize(done));
    return Result::Ok();
  }

  Result EnsureMeta(int64_t bytes) {
    if (bytes <= meta_cap) return Result::Ok();
    KVQ_RETURN_IF_ERROR(WaitIdle());
    int64_t cap = std::max<int64_t>(bytes, std::max<int64_t>(meta_cap * 2, 64 << 10));
    if (staging) KVQ_CUDA_RETURN(cudaFreeHost(staging));
    if (meta) KVQ_CUDA_RETURN(cudaFree(meta));
    staging = nullptr;
    meta = nullptr;
    meta_cap = 0;
    KVQ_CUDA_RETURN(cudaMallocHost(&staging, cap));
    KVQ_CUDA_RETURN(cudaMalloc(&meta, cap));
    meta_cap = cap;
    return Result::Ok();
  }

  // A zeroed device array of at least n entries of `per` Ts (grown after the previous use finished).
  template <typename T>
  Result EnsureZeroed(T** buf, int64_t* cap_entries, int64_t n, int per) {
    if (n <= *cap_entries) return Result::Ok();
    KVQ_RETURN_IF_ERROR(WaitIdle());
    const int64_t cap = std::max<int64_t>(n, std::max<int64_t>(*cap_entries * 2, 1024));
    if (*buf) KVQ_CUDA_RETURN(cudaFree(*buf));
    *buf = nullptr;
    *cap_entries = 0;
    KVQ_CUDA_RETURN(cudaMalloc(buf, cap * per * sizeof(T)));
    KVQ_CUDA_RETURN(cudaMemset(*buf, 0, cap * per * sizeof(T)));
    *cap_entries = cap;
    return Result::Ok();
  }
  // An output region for `bytes` of o after the flag. Growing it moves the flag (its value kept):
  // after the launches that may set it finished.
  Result EnsureOut(int64_t bytes) {
    if (kOutOffset + bytes <= out_cap) return Result::Ok();
    KVQ_RETURN_IF_ERROR(WaitIdle());
    const int64_t cap = std::max<int64_t>(kOutOffset + bytes, std::max<int64_t>(out_cap * 2, 64 << 10));
    uint8_t* d = nullptr;
    uint8_t* h = nullptr;
    KVQ_CUDA_RETURN(cudaMalloc(&d, cap));
    const cudaError_t e = cudaMallocHost(&h, cap);
    if (e != cudaSuccess) {
      cudaFree(d);
      return CudaError(e, "cudaMallocHost (the step's output staging)");
    }
    cudaError_t c = cudaMemset(d, 0, kOutOffset);
    if (c == cudaSuccess && out_dev) c = cudaMemcpy(d, out_dev, sizeof(int32_t), cudaMemcpyDeviceToDevice);
    if (c != cudaSuccess) {
      cudaFree(d);
      cudaFreeHost(h);
      return CudaError(c, "moving the error flag to the grown output region");
    }
    cudaFree(out_dev);
    cudaFreeHost(out_host);
    out_dev = d;
    out_host = h;
    out_cap = cap;
    error_flag = reinterpret_cast<int32_t*>(out_dev);
    return Result::Ok();
  }
  Result EnsureMergeCounters(int64_t items) { return EnsureZeroed(&merge_count, &merge_cap, items, 1); }
  Result EnsureItemSync(int64_t heads) { return EnsureZeroed(&item_sync, &item_sync_cap, heads, 2); }

  Result EnsureWorkspace(int64_t units, int head_dim) {
    if (units <= units_cap) return Result::Ok();
    KVQ_RETURN_IF_ERROR(WaitIdle());
    const int64_t cap = std::max<int64_t>(units, std::max<int64_t>(units_cap * 2, 1024));
    if (part_o) KVQ_CUDA_RETURN(cudaFree(part_o));
    if (part_ml) KVQ_CUDA_RETURN(cudaFree(part_ml));
    part_o = nullptr;
    part_ml = nullptr;
    units_cap = 0;
    // Sized for the largest head_dim the kernels support.
    KVQ_CUDA_RETURN(cudaMalloc(&part_o, cap * cuda::kRowsPerUnit * 128 * sizeof(float)));
    KVQ_CUDA_RETURN(cudaMalloc(&part_ml, cap * cuda::kRowsPerUnit * 2 * sizeof(float)));
    units_cap = cap;
    return Result::Ok();
  }
};

Result SetQuantizeAppendCarveout(int percent) {
  const cudaError_t e = cuda::SetQuantizeAppendCarveout(percent);
  return e == cudaSuccess ? Result::Ok()
                          : Result::Error(Code::kInternal, std::string("carveout: ") + cudaGetErrorString(e));
}

Result CudaStepRunner::Create(std::unique_ptr<CudaStepRunner>* out) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    return Result::Error(Code::kFailedPrecondition,
                         std::string("no CUDA device: ") + (e == cudaSuccess ? "none present" : cudaGetErrorString(e)));
  }
  std::unique_ptr<CudaStepRunner> r(new CudaStepRunner());
  r->impl_.reset(new Impl());
  Impl& m = *r->impl_;
  KVQ_CUDA_RETURN(cudaGetDevice(&m.device));
  KVQ_CUDA_RETURN(cudaDeviceGetAttribute(&m.num_sms, cudaDevAttrMultiProcessorCount, m.device));
  KVQ_CUDA_RETURN(cudaEventCreateWithFlags(&m.done, cudaEventDisableTiming));
  KVQ_RETURN_IF_ERROR(m.EnsureOut(0));
  KVQ_CUDA_RETURN(cudaMallocHost(&m.error_host, sizeof(int32_t)));
  *m.error_host = 0;
  *out = std::move(r);
  return Result::Ok();
}

CudaStepRunner::~CudaStepRunner() = default;

namespace {

// Fills a DevTensor and checks that the pages cover what the step touches. flush_done: the flush's
// codes are in place already (SeqWork::flush_done), so the kernels see the state after it: the
// flushed tokens in the body, the window from the first token after them, nothing to flush.
Result FillTensor(const StreamView& sv, const TensorFormat& f, int flush, bool flush_done, int appended_to_window,
                  int num_kv_heads, int head_dim, int64_t* page_cursor, cuda::DevTensor* t,
                  const char* name, int seq) {
  auto bad = [&](const std::string& what) {
    return Result::Error(Code::kInvalidArgument,
                         "sequence " + std::to_string(seq) + " " + name + ": " + what);
  };
  if (sv.body_len < 0 || sv.win_len < 0 || sv.win_first < 0 || sv.win_first >= kPageTokens ||
      flush < 0 || sv.num_body_pages < 0 || sv.num_win_pages < 0)
    return bad("negative length or bad window start");
  if (flush > sv.win_len) return bad("flush exceeds the window");
  if (flush > 0 && !f.quantized()) return bad("flush of a full-precision tensor");
  if (f.quantized() && f.grouping == Grouping::kAlongTokens &&
      (sv.body_len % f.group_size != 0 || flush % f.group_size != 0))
    return bad("along_tokens body and flush must be multiples of the group size");
  const int64_t body_need = (int64_t{sv.body_len} + flush + kPageTokens - 1) / kPageTokens;
  const int64_t win_need =
      (int64_t{sv.win_first} + sv.win_len + appended_to_window + kPageTokens - 1) / kPageTokens;
  if (sv.num_body_pages < body_need) return bad("body pages do not cover body + flush");
  if (sv.num_win_pages < win_need) return bad("window pages do not cover window + appended");
  if ((sv.num_body_pages > 0 && !sv.body_pages) || (sv.num_win_pages > 0 && !sv.win_pages))
    return bad("null page array");
  for (int i = 0; i < sv.num_body_pages; ++i)
    if (sv.body_pages[i] < 0 || sv.body_pages[i] % 16) return bad("bad body page offset");
  for (int i = 0; i < sv.num_win_pages; ++i)
    if (sv.win_pages[i] < 0 || sv.win_pages[i] % 16) return bad("bad window page offset");
  const StreamLayout l = MakeStreamLayout(f, num_kv_heads, head_dim);
  t->sink_page = sv.sink_page;
  t->body_len = sv.body_len;
  t->win_first = sv.win_first;
  t->win_len = sv.win_len;
  t->flush = flush;
  t->body_pages = static_cast<int32_t>(*page_cursor);
  *page_cursor += sv.num_body_pages;
  t->win_pages = static_cast<int32_t>(*page_cursor);
  *page_cursor += sv.num_win_pages;
  t->num_body_pages = sv.num_body_pages;
  t->num_win_pages = sv.num_win_pages;
  if (flush_done && flush > 0) {
    t->body_len += flush;
    t->win_len -= flush;
    t->win_first += flush;
    t->flush = 0;
    // the window's first page is the one that holds its first token (as the window pages of the
    // state after the flush; an emptied window keeps its next slot, where the append goes)
    const int drop = std::min(t->win_first / kPageTokens, t->num_win_pages);
    t->win_pages += drop;
    t->num_win_pages -= drop;
    t->win_first -= drop * kPageTokens;
  }
  t->mode = static_cast<int32_t>(f.mode);
  t->bits = f.bits;
  t->grouping = static_cast<int32_t>(f.grouping);
  t->group_size = f.group_size;
  t->words_per_group = l.words_per_group;
  t->scales_offset = static_cast<int32_t>(l.scales_offset);
  t->zeros_offset = static_cast<int32_t>(l.zeros_offset);
  t->head_bytes = static_cast<int32_t>(l.head_bytes);
  t->has_zeros = f.has_zeros() ? 1 : 0;
  return Result::Ok();
}

}  // namespace

namespace cuda {

Result FlattenBatch(const StepParams& p, const SeqWork* works, const QuantConfig* configs, int num_seqs,
                    std::vector<DevSeq>* seqs_out, std::vector<int64_t>* pages_out, bool* attention_ready_out) {
  std::vector<DevSeq>& seqs = *seqs_out;
  seqs.assign(num_seqs, DevSeq{});
  int64_t num_pages = 0;
  for (int i = 0; i < num_seqs; ++i) num_pages += works[i].k.num_body_pages + works[i].k.num_win_pages +
                                                  works[i].v.num_body_pages + works[i].v.num_win_pages;
  std::vector<int64_t>& pages = *pages_out;
  pages.clear();
  pages.reserve(num_pages);
  int64_t cursor = 0;
  bool& attention_ready = *attention_ready_out;
  attention_ready = num_seqs > 0;
  for (int i = 0; i < num_seqs; ++i) {
    const SeqWork& w = works[i];
    const QuantConfig& c = configs[i];
    DevSeq& d = seqs[i];
    std::memset(&d, 0, sizeof(d));
    if (w.n_new < 0) return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) + ": n_new < 0");
    if (w.n_new == 0) attention_ready = false;
    if (w.sink_len < 0 || w.sink_len > c.sink)
      return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) + ": sink_len outside [0, sink]");
    d.sink_len = w.sink_len;
    d.sink_cap = c.sink;
    d.n_new = w.n_new;
    d.to_sink = std::min(w.n_new, c.sink - w.sink_len);
    d.kv_row = w.kv_row;
    d.q_row = w.q_row;
    // The key-norm factors matter once keys are quantized (a body after this step's flush);
    // before that the planner may not have allocated them yet.
    const bool norm_used = c.key_norm && (int64_t{w.k.body_len} + w.flush_k > 0);
    d.key_norm = norm_used ? 1 : 0;
    d.compute_norm = w.compute_norm && !(w.flush_done && w.flush_k > 0) ? 1 : 0;  // done with the flush
    d.norm_offset = w.norm_offset;
    if ((norm_used || w.compute_norm) && (w.norm_offset < 0 || w.norm_offset % 16))
      return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) + ": key_norm needs a norm_offset");
    if (w.compute_norm && !c.key_norm)
      return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) + ": compute_norm without key_norm");
    if (c.sink > 0 && (w.k.sink_page < 0 || w.v.sink_page < 0 || w.k.sink_page % 16 || w.v.sink_page % 16))
      return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) + ": the sink needs sink pages");
    if (w.sink_len < c.sink && (w.k.win_len > 0 || w.k.body_len > 0 || w.v.win_len > 0 || w.v.body_len > 0))
      return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) + ": tokens after an unfilled sink");
    const int to_win = w.n_new - d.to_sink;
    KVQ_RETURN_IF_ERROR(FillTensor(w.k, c.k, w.flush_k, w.flush_done, to_win, p.num_kv_heads, p.head_dim, &cursor, &d.k, "k", i));
    pages.insert(pages.end(), w.k.body_pages, w.k.body_pages + w.k.num_body_pages);
    pages.insert(pages.end(), w.k.win_pages, w.k.win_pages + w.k.num_win_pages);
    KVQ_RETURN_IF_ERROR(FillTensor(w.v, c.v, w.flush_v, w.flush_done, to_win, p.num_kv_heads, p.head_dim, &cursor, &d.v, "v", i));
    pages.insert(pages.end(), w.v.body_pages, w.v.body_pages + w.v.num_body_pages);
    pages.insert(pages.end(), w.v.win_pages, w.v.win_pages + w.v.num_win_pages);
    const int64_t lk = int64_t{w.sink_len} + d.to_sink + w.k.body_len + w.k.win_len + to_win;
    const int64_t lv = int64_t{w.sink_len} + d.to_sink + w.v.body_len + w.v.win_len + to_win;
    if (lk != lv)
      return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) + ": K and V lengths differ");
    if (lk > (int64_t{1} << 30)) return Result::Error(Code::kInvalidArgument, "sequence too long");
    d.length = static_cast<int32_t>(lk);
  }

  return Result::Ok();
}

bool QaHeadFits(const std::vector<DevSeq>& seqs, int head_dim) {
  if (2 * (head_dim / 8) > kQaHeadWarps * 32) return false;  // a thread per 16 bytes of the two new rows
  for (const DevSeq& d : seqs) {
    if (d.n_new > 1 || d.kv_row > INT32_MAX || (d.compute_norm && d.key_norm && d.k.flush > 0)) return false;
    int groups = 0;
    for (const DevTensor* x : {&d.k, &d.v}) {
      if (x->flush <= 0 || x->mode == static_cast<int32_t>(QuantMode::kFull)) continue;
      if (x->flush != 1 || x->grouping != static_cast<int32_t>(Grouping::kAlongChannels) || x->group_size != 32)
        return false;
      groups += head_dim / 32;
    }
    if (groups > kQaHeadWarps * kQaHeadGroupsPerWarp) return false;
  }
  return true;
}

void BuildQaHeads(const std::vector<DevSeq>& seqs, const std::vector<int64_t>& pages, int head_dim,
                  std::vector<DevQaHead>* heads) {
  heads->assign(seqs.size() * 2, DevQaHead{});
  for (size_t i = 0; i < seqs.size(); ++i) {
    const DevSeq& d = seqs[i];
    for (int ti = 0; ti < 2; ++ti) {
      const DevTensor& x = ti ? d.v : d.k;
      DevQaHead& o = (*heads)[2 * i + ti];
      o.flush_src = o.flush_dst = o.append_dst = o.norm = -1;
      o.append_row = -1;
      o.bits = x.bits;
      o.mode = x.mode;
      o.words_per_group = x.words_per_group;
      o.scales_offset = x.scales_offset;
      o.zeros_offset = x.zeros_offset;
      o.head_bytes = x.head_bytes;
      o.has_zeros = x.has_zeros;
      if (x.flush > 0 && x.mode != static_cast<int32_t>(QuantMode::kFull)) {  // one token (QaHeadFits)
        o.groups = head_dim / x.group_size;
        o.flush_src = pages[x.win_pages + x.win_first / kPageTokens] + FullTokenOffset(x.win_first % kPageTokens, 0, head_dim);
        o.flush_dst = pages[x.body_pages + x.body_len / kPageTokens];
        o.group0 = (x.body_len % kPageTokens) * (head_dim / x.group_size);
        o.norm = ti == 0 && d.key_norm ? d.norm_offset : -1;
      }
      if (d.n_new > 0) {  // the first new token (QaHeadFits: the only one)
        if (d.to_sink > 0) {
          o.append_dst = x.sink_page + FullTokenOffset(d.sink_len, 0, head_dim);
        } else {
          const int w = x.win_first + x.win_len;
          o.append_dst = pages[x.win_pages + w / kPageTokens] + FullTokenOffset(w % kPageTokens, 0, head_dim);
        }
        o.append_row = static_cast<int32_t>(d.kv_row);
      }
    }
  }
}

int64_t QaPlanBlocks(const QaPlan& plan, int num_seqs, int num_kv_heads) {
  return int64_t{num_seqs} * num_kv_heads * (plan.head ? 1 : plan.k_chunks + plan.v_chunks);
}

int64_t QaPlanTraceWarps(const QaPlan& plan, int num_seqs, int num_kv_heads) {
  return plan.head ? int64_t{num_seqs} * num_kv_heads * kQaHeadWarps
                   : QaTraceWarps(num_seqs, num_kv_heads, plan.k_chunks + plan.v_chunks);
}

QaPlan PlanQuantizeAppend(const std::vector<DevSeq>& seqs, int head_dim, int64_t min_lane_groups, bool head) {
  QaPlan plan;
  // most flush groups of one head; warp tasks per tensor, one group per warp and with lanes (32
  // along_tokens groups of 32 per warp); such groups summed over the batch (per KV head)
  int64_t groups = 0, tasks[2] = {0, 0}, lane_tasks[2] = {0, 0}, lane_groups = 0;
  for (const DevSeq& d : seqs) {
    for (int v = 0; v < 2; ++v) {
      const DevTensor& t = v ? d.v : d.k;
      if (t.flush <= 0 || t.mode == static_cast<int32_t>(QuantMode::kFull)) continue;
      const bool along_channels = t.grouping == static_cast<int32_t>(Grouping::kAlongChannels);
      const int64_t n = along_channels ? int64_t{t.flush} * (head_dim / t.group_size)
                                       : int64_t{t.flush / t.group_size} * head_dim;
      const bool lane = LaneFlush(t);
      plan.hybrid = plan.hybrid || t.mode == static_cast<int32_t>(QuantMode::kHybrid);
      groups = std::max(groups, n);
      tasks[v] = std::max(tasks[v], n);
      lane_tasks[v] = std::max(lane_tasks[v], lane ? (n + 31) / 32 : n);
      lane_groups += lane ? n : 0;
    }
    plan.key_norm = plan.key_norm ||
                    (d.compute_norm && d.key_norm && d.k.flush > 0 && d.k.mode != static_cast<int32_t>(QuantMode::kFull));
  }
  plan.lanes = min_lane_groups >= 0 && lane_groups > 0 && lane_groups >= min_lane_groups;
  plan.chunks = QaChunks(groups);
  plan.k_chunks = QaChunks(plan.lanes ? lane_tasks[0] : tasks[0]);
  plan.v_chunks = QaChunks(plan.lanes ? lane_tasks[1] : tasks[1]);
  plan.head = head && !plan.key_norm && QaHeadFits(seqs, head_dim);
  return plan;
}

}  // namespace cuda

Result CudaStepRunner::Prepare(const StepParams& p, const SeqWork* works, const QuantConfig* configs,
                               int num_seqs, cudaStream_t stream, const SeqWork* flush_after) {
  return PrepareImpl(p, works, configs, num_seqs, stream, flush_after, nullptr);
}

Result CudaStepRunner::PrepareImpl(const StepParams& p, const SeqWork* works, const QuantConfig* configs,
                                   int num_seqs, cudaStream_t stream, const SeqWork* flush_after,
                                   const HostInputs* in) {
  Impl& m = *impl_;
  m.prepared = false;
  const std::string sup = CudaSupports(p, configs, num_seqs);
  if (!sup.empty()) return Result::Error(Code::kInvalidArgument, sup);
  const int g = p.num_q_heads / p.num_kv_heads;

  std::vector<cuda::DevSeq>& seqs = m.seqs;
  std::vector<int64_t>& pages = m.pages;
  bool attention_ready = false;
  KVQ_RETURN_IF_ERROR(cuda::FlattenBatch(p, works, configs, num_seqs, &seqs, &pages, &attention_ready));
  // The flush after the attention: the states after this step, nothing appended.
  std::vector<cuda::DevSeq>& fseqs = m.fseqs;
  std::vector<int64_t>& fpages = m.fpages;
  fseqs.clear();
  fpages.clear();
  // Along_tokens groups of 32 one per lane (set_qa_lanes): by default where one group per warp would
  // take more than kQaLaneWaves waves of the device's resident quantize-append warps.
  const int64_t min_lane_groups =
      qa_lanes_mode_ == 0   ? -1
      : qa_lanes_mode_ == 1 ? 0
                            : (int64_t{cuda::kQaLaneWaves} * m.num_sms * cuda::QuantizeAppendBlocksPerSm() *
                                   (cuda::kQaThreads / 32) + p.num_kv_heads - 1) / p.num_kv_heads;
  // One block per (sequence, KV head) where the step allows (set_qa_head; on by default).
  const bool head = qa_head_mode_ != 0;
  auto plan_qa = [&](const std::vector<cuda::DevSeq>& batch) {
    cuda::QaPlan plan = cuda::PlanQuantizeAppend(batch, p.head_dim, min_lane_groups, head);
    if (!qa_split_chunks_) plan.k_chunks = plan.v_chunks = std::max(plan.k_chunks, plan.v_chunks);
    return plan;
  };
  cuda::QaPlan flush_plan;
  bool flush_any = false;
  if (flush_after) {
    bool unused = false;
    KVQ_RETURN_IF_ERROR(cuda::FlattenBatch(p, flush_after, configs, num_seqs, &fseqs, &fpages, &unused));
    for (const cuda::DevSeq& d : fseqs) {
      if (d.n_new != 0)
        return Result::Error(Code::kInvalidArgument, "a flush after the attention appends nothing: every n_new must be 0");
      flush_any = flush_any || d.k.flush > 0 || d.v.flush > 0 || d.compute_norm;
    }
    flush_plan = plan_qa(fseqs);
    if (!flush_any) fseqs.clear(), fpages.clear();  // nothing to quantize (fp16 sessions): no launch
  }

  // Split-KV plan: items = (sequence, KV head, block of <= kRowsPerUnit rows); each item's
  // visible tokens are cut into chunks so that the grid covers the SMs several times.
  std::vector<cuda::DevMergeItem>& items = m.items;
  items.clear();
  int64_t total_tokens = 0;
  if (attention_ready) {
    for (int i = 0; i < num_seqs; ++i) {
      const int rows = seqs[i].n_new * g;
      for (int h = 0; h < p.num_kv_heads; ++h) {
        for (int r0 = 0; r0 < rows; r0 += cuda::kRowsPerUnit) {
          cuda::DevMergeItem it{};
          it.seq = i;
          it.kv_head = h;
          it.row0 = r0;
          it.num_rows = std::min(cuda::kRowsPerUnit, rows - r0);
          items.push_back(it);
          const int last_q = (r0 + it.num_rows - 1) / g;
          total_tokens += seqs[i].length - seqs[i].n_new + last_q + 1;
        }
      }
    }
  }
  // Units are sized so that they fit in one wave of resident blocks (a second, partial wave
  // would double the time): chunk grows until the unit count is at most the capacity.
  const bool decode_path = attention_ready && !force_generic_ && DecodeFastPathFits(p, works, configs, num_seqs);
  // The fused step is possible on the decode path only (the generic kernel's units all read the new
  // tokens), on the steps whose quantize-append is a few groups per head (the every-step
  // along_channels flush of one token and the append): there each head's first waiting unit runs
  // it. A step that flushes along_tokens groups (32 or 128 tokens, up to 64 blocks per head) or
  // computes the key-norm factors launches the quantize-append on its own (1 in 32 to 128 steps).
  cuda::QaPlan qa_plan = plan_qa(seqs);
  const bool fused_possible = decode_path && !qa_plan.key_norm && qa_plan.chunks <= 2;
  int max_rows = std::clamp(min_row_class_, 1, cuda::kRowsPerUnit);
  for (const auto& it : items) max_rows = std::max(max_rows, it.num_rows);
  const int decode_paths = DecodePaths(configs, num_seqs);
  // Tensor-core body units (decode_imma.cuh): InnerQ-family batches with <= 4 rows per unit, for
  // the sequences whose formats an IMMA instance covers. Their per-warp cp.async rings hold whole
  // body tiles of K and V; three stages (two tiles ahead) when that costs no resident blocks
  // against two, else two, unless set_ring_stages asked for a number. Page units
  // (decode_pages.cuh) take two stages even where three fit as many blocks: three pages ahead
  // measured 1.1-1.8% slower at (16,32,8,32768) and (64,32,8,8192) for innerq and innerq2, and
  // at one row innerq2's step (attention + quantize-append) 0.5-1.5% slower at (1,32,32,32768) and
  // (16,32,32,4096) (H100, docs/gpu_notes.md, twenty-fourth session).
  // (one row: the per-token path's integer products on the codes are cheaper, see decode.cuh)
  const bool imma_family = decode_path && imma_enabled_ && cuda::DecodeFamilyIsInnerQ(decode_paths) &&
                           max_rows >= 2 && max_rows <= cuda::kImmaMaxRows;
  // an InnerQ-layout format of the bits the IMMA instances are built for (IMMA and page units)
  auto imma_shape = [](const QuantConfig& c) {
    return c.k.quantized() && c.v.quantized() && c.k.grouping == Grouping::kAlongChannels &&
           c.v.grouping == Grouping::kAlongTokens && c.k.group_size == 32 && c.v.group_size == 32 &&
           cuda::ImmaBits(c.k.bits, c.v.bits);
  };
  auto imma_config = [&](const QuantConfig& c) { return imma_family && imma_shape(c); };
  // InnerQ family, up to 4 rows: the whole body pages of K and V (the IMMA units' bits) in page
  // units (decode_pages.cuh), whose block ring holds a page of one head per slot: with one row on
  // the per-token path's integer products, with 2-4 on the IMMA units' tensor-core tiles.
  bool page_family = decode_path && imma_enabled_ && page_units_enabled_ &&
                     cuda::DecodeFamilyIsInnerQ(decode_paths) && max_rows <= cuda::kImmaMaxRows;
  auto page_seq = [&](const QuantConfig& c, const cuda::DevSeq& d) {
    return page_family && imma_shape(c) && d.k.head_bytes % 16 == 0 && d.v.head_bytes % 16 == 0;
  };
  // Only where the batch has enough whole body pages per resident block of the per-token instance
  // (set_page_min_pages): a unit computes nothing before its first whole page has landed.
  const int min_pages = page_min_pages_ >= 0 ? page_min_pages_
                        : max_rows == 1 ? CudaStepRunner::kPageMinPagesOneRow
                                        : CudaStepRunner::kPageMinPagesRows;
  if (page_family && min_pages > 0) {
    int64_t pages = 0;
    for (const auto& it : items) {
      const cuda::DevSeq& d = seqs[it.seq];
      if (page_seq(configs[it.seq], d))
        pages += std::min(d.k.body_len + d.k.flush, d.v.body_len + d.v.flush) / kPageTokens;
    }
    const int64_t blocks =
        int64_t{m.num_sms} * std::max(1, cuda::DecodeBlocksPerSm(p.head_dim, p.dtype, max_rows, decode_paths, 0));
    page_family = pages >= min_pages * blocks;
  }
  // fp16-family batches (every token in full precision): every unit on the fp16 / bf16 tensor
  // cores (decode_mma.cuh), its ring slots holding a K and a V tile of [32][D] activations.
  bool mma_full = decode_path && imma_enabled_ && cuda::DecodeFamilyIsFull(decode_paths);
  // KIVI-family batches: body tiles on the tensor cores, for the sequences whose bits are built.
  // Two kinds of units: the packed codes as operands (decode_kivi_codes.cuh; the default, asym K
  // and V, any rows and dtype), or each tile dequantized into fp16 in shared memory
  // (decode_mma_kivi.cuh; 2-8 rows, fp16 activations only: rounded to bf16, the dequantized keys
  // and values put the attention error beyond the bf16 bound of the GPU tests, 1.1e-2 against 8e-3
  // measured). A batch takes one kind for all its KIVI sequences. Either only where a unit gets
  // several tiles per warp: with one or two the ring cannot hide the latency and the per-token path
  // was faster ((1,9,3,8192): 37 -> 43 us, dequantizing units).
  auto kivi_shape = [&](const QuantConfig& c) {
    return c.k.quantized() && c.v.quantized() && c.k.grouping == Grouping::kAlongTokens &&
           c.v.grouping == Grouping::kAlongChannels && c.k.group_size == 32 && c.v.group_size == 32 &&
           cuda::KiviMmaBits(c.k.bits, c.v.bits);
  };
  const bool kivi_batch = decode_path && imma_enabled_ && cuda::DecodeFamilyIsKivi(decode_paths) &&
                          total_tokens >= int64_t{kivi_min_unit_tokens_ >= 0 ? kivi_min_unit_tokens_
                                                                            : kKiviMmaMinUnitTokens} *
                                              m.num_sms * 2;
  bool kivi_codes = kivi_codes_mode_ != 0 && kivi_batch;
  for (int i = 0; i < num_seqs && kivi_codes; ++i)
    if (kivi_shape(configs[i]) && (configs[i].k.mode != QuantMode::kAsym || configs[i].v.mode != QuantMode::kAsym ||
                                   !cuda::KiviCodesLayout(seqs[i].k, p.head_dim) ||
                                   !cuda::KiviCodesLayout(seqs[i].v, p.head_dim)))
      kivi_codes = false;
  const bool kivi_family = kivi_batch && (kivi_codes || (max_rows >= 2 && p.dtype == DType::kF16));
  // (one row, 4-bit: on the code units too since the rings are aligned: 1.08-1.09x the per-token
  // path at (1,32,32,32768) and (16,32,32,4096), 1.01x at (1,32,32,4096); H100, 2026-12-05)
  auto kivi_config = [&](const QuantConfig& c) { return kivi_family && kivi_shape(c); };
  int ring_slot_bytes = mma_full ? 2 * cuda::kTileTokens * p.head_dim * 2 : 0;
  int ring_work_bytes = 0;
  for (int i = 0; i < num_seqs; ++i) {
    const QuantConfig& c = configs[i];
    if (kivi_config(c) && kivi_codes) {
      ring_slot_bytes = std::max(ring_slot_bytes, cuda::KiviCodesSlotBytes(p.head_dim, c.k.bits, c.v.bits));
    } else if (kivi_config(c)) {
      ring_work_bytes = cuda::kTileTokens * p.head_dim * 2;
      ring_slot_bytes = std::max(ring_slot_bytes, cuda::BodyTileBytes(p.head_dim, c.k.bits, c.k.has_zeros()) +
                                                      cuda::BodyTileBytes(p.head_dim, c.v.bits, c.v.has_zeros()));
    }
    if (imma_config(c))
      ring_slot_bytes = std::max(ring_slot_bytes, cuda::BodyTileBytes(p.head_dim, c.k.bits, c.k.has_zeros()) +
                                                      cuda::BodyTileBytes(p.head_dim, c.v.bits, c.v.has_zeros()));
    if (page_seq(c, seqs[i])) {  // a page slot is kDecWarps "warp slots"; the mbarriers after the slots
      ring_slot_bytes = std::max(ring_slot_bytes, cuda::PageSlotBytes(seqs[i].k.head_bytes, seqs[i].v.head_bytes));
      ring_work_bytes = cuda::kPageWorkBytes;
    }
  }
  // Each item's visible tokens as segments of one unit kind: on the InnerQ decode family with <= 4
  // rows, the tiles inside both bodies go to the tensor-core units (decode_imma.cuh), the sink
  // before them and the rest after them to the per-token units; otherwise one segment.
  SegmentLists& segments = m.segments;
  segments.Clear();
  int64_t max_visible = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    const cuda::DevSeq& d = seqs[items[k].seq];
    const QuantConfig& c = configs[items[k].seq];
    const int64_t visible = d.length - d.n_new + (items[k].row0 + items[k].num_rows - 1) / g + 1;
    max_visible = std::max(max_visible, visible);
    const bool pages_seq = page_seq(c, d);
    const bool imma_seq = imma_config(c) || kivi_config(c) || pages_seq;
    const int64_t b0 = d.sink_len + d.to_sink;
    const int64_t whole = pages_seq ? kPageTokens : cuda::kTileTokens;  // page units: whole pages
    const int64_t body = std::min(d.k.body_len + d.k.flush, d.v.body_len + d.v.flush) / whole * whole;
    std::vector<Segment>& seg = segments.all;
    if (imma_seq && body >= whole && b0 + body <= visible) {
      // sink and window: one per-token unit that steps over the body
      if (b0 > 0 || b0 + body < visible) seg.push_back({0, visible, cuda::kUnitTokens, b0, b0 + body});
      seg.push_back({b0, b0 + body, pages_seq ? cuda::kUnitPages : cuda::kUnitImmaBody, 0, 0});
    } else {
      seg.push_back({0, visible, cuda::kUnitTokens, 0, 0});
    }
    segments.EndItem();
  }
  bool has_imma = false, has_pages = false;
  for (const Segment& x : segments.all) {
    has_imma = has_imma || x.kind != cuda::kUnitTokens;
    has_pages = has_pages || x.kind == cuda::kUnitPages;
  }
  // The launch picks the kernel instance with IMMA units (other launch bounds) from this flag.
  if (!has_imma && !mma_full) ring_slot_bytes = ring_work_bytes = 0;  // no ring: no dynamic shared memory
  int launch_paths = decode_paths | (has_imma || mma_full ? cuda::kDecodeImmaUnits : 0) |
                     (has_imma && kivi_codes ? cuda::kDecodeKiviCodeUnits : 0);
  int ring_stages = 2;
  int blocks_per_sm = 0;
  if (decode_path) {
    auto blocks = [&](int stages) {
      return cuda::DecodeBlocksPerSm(p.head_dim, p.dtype, max_rows, launch_paths,
                                     cuda::DecodeRingBytes(stages, ring_slot_bytes, ring_work_bytes, ring_offset_));
    };
    const bool kivi_units = has_imma && kivi_family;
    auto choose = [&] {
      if (ring_stages_ == 2 || ring_stages_ == 3 || (kivi_units && ring_stages_ >= 2 && ring_stages_ <= 6)) {
        ring_stages = ring_stages_;
        blocks_per_sm = blocks(ring_stages);
      } else if (kivi_units) {
        // small packed tiles: the most resident blocks (warps hide the dequantization's latency;
        // 1 block of 6 stages was slower than 2 of 2 for kivi4), then the deepest ring at that count
        ring_stages = 2;
        blocks_per_sm = blocks(2);
        for (int st = 3; st <= 6; ++st) {
          const int b = blocks(st);
          if (b < blocks_per_sm) break;
          ring_stages = st;
        }
      } else {
        ring_stages = 2;
        blocks_per_sm = blocks(2);
        const int b3 = has_pages ? 0 : blocks(3);
        if (b3 > 0 && b3 >= blocks_per_sm) {
          ring_stages = 3;
          blocks_per_sm = b3;
        }
      }
    };
    choose();
    if (blocks_per_sm == 0 && mma_full) {  // the ring does not fit this device: the per-token path
      mma_full = false;
      ring_slot_bytes = 0;
      launch_paths = decode_paths;
      choose();
    }
    blocks_per_sm = std::max(blocks_per_sm, 1);  // a launch that cannot run reports its error
  } else {
    blocks_per_sm = cuda::AttentionBlocksPerSm(p.head_dim, p.dtype);
  }
  // The decode kernel's 4 warps take 32-token tiles in turn: its units are multiples of 128.
  const int64_t quantum = decode_path ? 4 * cuda::kTileTokens : cuda::kTileTokens;
  int64_t capacity =
      split_blocks_ > 0 ? int64_t{split_blocks_} : std::max<int64_t>(1, int64_t{m.num_sms} * blocks_per_sm);
  // fp16 tensor-core units, and InnerQ IMMA units, with several blocks per SM where every resident
  // block would get at most one tile per warp: one block's worth of units per SM instead, so that
  // each warp's ring has a second tile to load while it computes the first. (1,9,3,8192) on an
  // H200: fp16 15.4 us at 2 blocks per SM, 13.9 at one (--split-blocks 132), SDPA 13.5; innerq
  // 18.7-18.8 us at 264 / 396 / 528 units' capacity, 17.0 at 132 (2026-12-05, fourth session).
  // The same for KIVI batches on the per-token path (too short for the code units): (1,9,3,8192) on
  // an H100, kivi2 25.6-25.8 -> 23.9 us, kivi4 29.6-29.7 -> 28.1-28.2 (2026-12-05, tenth session,
  // bench/device_kivi_small.sh; (1,32,32,4096) is past the rule's token bound, and one block's
  // worth of units per SM measured 1.8x slower there).
  const bool innerq_units = has_imma && !kivi_family;  // the body units are InnerQ IMMA units
  const bool kivi_tokens = decode_path && !has_imma && !mma_full && cuda::DecodeFamilyIsKivi(decode_paths);
  if ((mma_full || innerq_units || kivi_tokens) && split_blocks_ == 0 && blocks_per_sm > 1 &&
      total_tokens <= capacity * quantum)
    capacity = std::max<int64_t>(1, m.num_sms);
  // Fused by default only where it measured faster than two launches (H100, 2026-12-05, the
  // 128-step chain's qa_step, bench/results/gpu_kernels.md): few items (one-row plans) of long KIVI
  // or fp16 sequences ((1,32,32,32768): kivi2 4.8 -> 2.7 us, kivi4 5.5 -> 3.1, fp16 1.7 -> -0.6).
  // Elsewhere the head's quantize-append (8.5-10 us alone in a decode loop) cost more inside its
  // owner unit, before that unit's attention, than as its own launch overlapping the attention's
  // ((1,32,32,4096) innerq 2.6 -> 9.6 us, (64,32,8,8192) kivi2 12.5 -> 18.9), and InnerQ's tail
  // units cost its attention 3%.
  bool fused_auto = static_cast<int64_t>(items.size()) * 8 <= capacity && max_visible >= 16384;
  for (int i = 0; i < num_seqs && fused_auto; ++i) {
    const QuantConfig& c = configs[i];
    const bool kivi = c.k.quantized() && c.v.quantized() && c.k.grouping == Grouping::kAlongTokens &&
                      c.v.grouping == Grouping::kAlongChannels;
    fused_auto = kivi || (!c.k.quantized() && !c.v.quantized());
  }
  const bool fused = fused_possible && (fused_mode_ >= 0 ? fused_mode_ == 1 : fused_auto);
  auto round_up = [quantum](int64_t x) { return (x + quantum - 1) / quantum * quantum; };
  // Units of chunk c, not counting the whole ones around a body: the split segments' lengths as
  // runs of equal lengths (a batch's sequences are mostly alike: the 512 items of (64,32,8,8192)
  // are one run), each divided once per chunk the search below tries.
  std::vector<std::pair<int64_t, int64_t>>& runs = m.length_runs;
  auto count_units = [&](int64_t c) {
    int64_t n = 0;
    for (const auto& [len, count] : runs) n += count * ((len + c - 1) / c);
    return n;
  };
  auto make_runs = [&] {
    runs.clear();
    for (const Segment& sg : segments.all) {
      if (sg.skip_end > sg.skip_begin) continue;
      const int64_t len = sg.end - sg.begin;
      if (!runs.empty() && runs.back().first == len) ++runs.back().second;
      else runs.push_back({len, 1});
    }
  };
  // Few items (small batches, the real model's few KV heads): the sink and the window around a
  // tensor-core body become per-token units of their own, split like any other, so that no warp
  // walks two of their tiles one after the other. Their per-token tiles are a chain of dependent
  // loads each (page table, K rows, V rows in batches), so a unit's second tile per warp was the
  // critical path of the whole launch where the body units have one or two tiles per warp.
  SegmentLists& split = m.split;
  if (static_cast<int64_t>(items.size()) * 8 <= capacity) {
    split.Clear();
    for (size_t k = 0; k < items.size(); ++k) {
      for (const Segment* sg = segments.begin(k); sg != segments.end(k); ++sg) {
        if (sg->skip_end > sg->skip_begin) {
          if (sg->skip_begin > sg->begin) split.all.push_back({sg->begin, sg->skip_begin, cuda::kUnitTokens, 0, 0});
          if (sg->end > sg->skip_end) split.all.push_back({sg->skip_end, sg->end, cuda::kUnitTokens, 0, 0});
        } else {
          split.all.push_back(*sg);
        }
      }
      split.EndItem();
    }
    std::swap(segments, split);
  }
  // Few items, as above, of KIVI-layout sequences (keys along tokens, values along channels): a
  // per-token segment is cut after its longest run of whole 4-tile steps whose tiles, and one more
  // (UnitWaitsForQuantizeAppend's extent), meet none of the quantize-append's writes; the rest, up
  // to the end, becomes a unit of its own, the window's per-token tiles apart from the body's. Measured on an H100
  // (2026-12-05, two runs): kivi2 / kivi4 at (1,32,32,4096) 1.22-1.29x faster (42.1 -> 32.9 us,
  // 48.1 -> 39.5), elsewhere within 1%; not what it was written for (only the short tail would wait
  // for the quantize-append: the step's added time did not move). For InnerQ and fp16 sequences
  // the extra unit cost 3-5% ((1,32,32,32768) innerq, (1,9,3,8192) fp16): not cut, except in a
  // fused step, where the head's first waiting unit also runs the quantize-append (8.5-10 us in a
  // decode loop): that unit must be short.
  if (static_cast<int64_t>(items.size()) * 8 <= capacity) {
    split.Clear();
    for (size_t k = 0; k < items.size(); ++k) {
      const QuantConfig& c = configs[items[k].seq];
      const cuda::DevSeq& d = seqs[items[k].seq];
      const bool cut_item = fused || (c.k.quantized() && c.v.quantized() && c.k.grouping == Grouping::kAlongTokens &&
                                      c.v.grouping == Grouping::kAlongChannels);
      for (const Segment* it = segments.begin(k); it != segments.end(k); ++it) {
        const Segment& sg = *it;
        if (!cut_item || sg.kind != cuda::kUnitTokens || sg.skip_end > sg.skip_begin) {
          split.all.push_back(sg);
          continue;
        }
        // the last cut = begin + m quantum with [begin, cut + quantum + one tile) clear of the
        // step's writes and cut + quantum < end (m = 0 if none): in one step, not a walk over a
        // long body (32 heads of 32,768 tokens walked 8,192 times per step, ~40 us of host time)
        const int64_t w = cuda::FirstStepWriteFrom(d, int(sg.begin));
        const int64_t m_end = (sg.end - sg.begin + quantum - 1) / quantum - 1;  // cut + quantum < end
        const int64_t room = w - cuda::kTileTokens - sg.begin;       // cut + quantum + tile <= w
        const int64_t m_clear = room >= 0 ? room / quantum : 0;
        const int64_t cut = sg.begin + quantum * std::max<int64_t>(0, std::min(m_end, m_clear));
        if (cut > sg.begin && cuda::RangeMeetsStepWrites(d, int(cut), int(sg.end + cuda::kTileTokens))) {
          split.all.push_back({sg.begin, cut, cuda::kUnitTokens, 0, 0});
          split.all.push_back({cut, sg.end, cuda::kUnitTokens, 0, 0});
        } else {
          split.all.push_back(sg);
        }
      }
      split.EndItem();
    }
    std::swap(segments, split);
  }
  make_runs();
  // The per-token units around tensor-core bodies are short (sink + window): they take capacity
  // from the split only when they are few; otherwise they run first and the body units after them.
  int64_t num_around = 0;
  for (const Segment& sg : segments.all) num_around += sg.skip_end > sg.skip_begin ? 1 : 0;
  const int64_t split_capacity = num_around * 8 <= capacity ? std::max<int64_t>(1, capacity - num_around) : capacity;
  int64_t chunk =
      std::max<int64_t>(std::max<int64_t>(64, quantum), round_up((total_tokens + split_capacity - 1) / split_capacity));
  while (chunk < max_visible && count_units(chunk) > split_capacity)
    chunk += std::max<int64_t>(quantum, round_up(chunk / 16));
  // More units than resident blocks even with whole segments (more items than blocks): the units
  // run in waves, and a nearly empty last wave costs as much as a full one (kivi4 at
  // (64,32,8,8192): 512 whole bodies over 396 blocks, two waves for 1.3 waves of work). Then the
  // chunk with the smallest estimate of waves x (longest unit + a unit's fixed cost) wins; the
  // whole segments stay unless another chunk is at least 3% better.
  if (count_units(chunk) > split_capacity) {
    int64_t longest = 0;
    for (const Segment& sg : segments.all)
      if (sg.skip_end <= sg.skip_begin) longest = std::max(longest, sg.end - sg.begin);
    constexpr int64_t kUnitFixedTokens = 256;  // prologue, epilogue and merge, as tokens of work (estimate)
    auto makespan = [&](int64_t c) {
      const int64_t waves = (count_units(c) + split_capacity - 1) / split_capacity;
      return waves * (std::min(c, longest) + kUnitFixedTokens);
    };
    int64_t best = chunk, best_cost = makespan(chunk);
    for (int64_t c = 2 * quantum; c < chunk; c += std::max<int64_t>(quantum, round_up(c / 4))) {
      const int64_t x = makespan(c);
      if (x * 100 < best_cost * 97) {
        best = c;
        best_cost = x;
      }
    }
    chunk = best;
  }
  std::vector<cuda::DevUnit>& units = m.units;
  units.clear();
  int imma_units = 0, page_units = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    auto& it = items[k];
    it.unit0 = static_cast<int32_t>(units.size());
    for (const Segment* sgp = segments.begin(k); sgp != segments.end(k); ++sgp) {
      const Segment& sg = *sgp;
      const bool whole = sg.skip_end > sg.skip_begin;
      for (int64_t t0 = sg.begin; t0 < sg.end; t0 += whole ? sg.end - sg.begin : chunk) {
        cuda::DevUnit u{};
        u.seq = it.seq;
        u.kv_head = it.kv_head;
        u.row0 = it.row0;
        u.num_rows = it.num_rows;
        u.tok_begin = static_cast<int32_t>(t0);
        u.tok_end = static_cast<int32_t>(whole ? sg.end : std::min<int64_t>(sg.end, t0 + chunk));
        u.kind = sg.kind;
        u.skip_begin = static_cast<int32_t>(sg.skip_begin);
        u.skip_end = static_cast<int32_t>(sg.skip_end);
        u.part = static_cast<int32_t>(units.size());
        u.item = static_cast<int32_t>(k);
        imma_units += sg.kind == cuda::kUnitImmaBody ? 1 : 0;
        page_units += sg.kind == cuda::kUnitPages ? 1 : 0;
        units.push_back(u);
      }
    }
    it.num_units = static_cast<int32_t>(units.size()) - it.unit0;
  }
  if (units.size() > (size_t{1} << 31)) return Result::Error(Code::kInvalidArgument, "batch too large");
  // Launch order (the partials keep item order): the per-token units around the bodies (sink and
  // window, in full precision: ~76 MB of the 468 at (64,32,8,8192)) first, so that body units
  // beyond one wave start as soon as they finish; or the bodies first (set_bodies_first), where
  // they all fit in one wave beside free resident blocks and at most 8 per-token units share each
  // free block: those then stream beside the bodies instead of before them (and, with PDL, wait
  // for the quantize-append without holding a block a body needs); with more per free block their
  // queue outlasts the bodies, except beside KIVI code units: issue-bound, they leave the DRAM
  // bandwidth the per-token units need, so there the limit is 32. H100, attention around first ->
  // bodies first: (16,32,8,32768) innerq 216.5 -> 195.5 us, kivi2 262 -> 251 (8 per free block),
  // (16,32,32,4096) innerq 112.7 -> 110 (3.5) (raw/2026-12-06f/call1); at 32 per free block
  // ((64,32,8,8192), raw/2026-12-06g/call3) kivi2 281.0 -> 263.0 (step 288.8 -> 277.9), kivi4 398.2
  // -> 381.3 (step 408.5 -> 392.4), but the bandwidth-bound InnerQ page units innerq 218.3 -> 223.2
  // (step 231.0 -> 240.8). With the per-token units' full-precision tiles on the tensor cores (the
  // 4-row InnerQ tensor-core instance at head_dim 128, set_mma_tiles) the limit is 32 for the InnerQ
  // bodies too: at (64,32,8,8192) innerq2 206.3 -> 192.2 us, innerq 209.9 -> 205.7 (H100,
  // raw/2026-12-07i/call3; around first the tiles alone gained 0-0.5%).
  // (a stable partition through the runner's scratch: std::stable_partition allocates a buffer)
  const int64_t resident_blocks = int64_t{m.num_sms} * std::max(blocks_per_sm, 1);
  const int64_t body_units = imma_units + page_units;
  const int64_t around_units = int64_t(units.size()) - body_units;
  const bool mma_tiles = mma_tiles_ && p.head_dim == 128 && cuda::DecodeRowClass(max_rows) == 4 && has_imma &&
                         (!kivi_family || kivi_codes);  // the instance has MmaTokTiles (decode.cuh), wanted
  const int64_t around_per_free = (imma_units > 0 && page_units == 0 && kivi_family && kivi_codes) || mma_tiles ? 32 : 8;
  const bool bodies_first_auto = decode_path && int64_t(units.size()) > resident_blocks && body_units < resident_blocks &&
                                 around_units <= around_per_free * (resident_blocks - body_units);
  const bool bodies_first =
      body_units > 0 && (bodies_first_mode_ >= 0 ? bodies_first_mode_ == 1 : bodies_first_auto);
  // The quantize-append's carveout (set_qa_wide_carveout): the largest where the page units' bodies
  // go first.
  qa_plan.wide = qa_wide_mode_ >= 0 ? qa_wide_mode_ == 1 : bodies_first && page_units > 0;
  if (body_units > 0) {
    std::vector<cuda::DevUnit>& ordered = m.units_ordered;
    ordered.clear();
    for (const cuda::DevUnit& u : units)
      if ((u.kind == cuda::kUnitTokens) != bodies_first) ordered.push_back(u);
    for (const cuda::DevUnit& u : units)
      if ((u.kind == cuda::kUnitTokens) == bodies_first) ordered.push_back(u);
    std::swap(units, ordered);
  }

  // Page units that do not wait for the quantize-append: their first page's runs, so that the
  // block issues its copies before reading any descriptor (set_early_pages; launch order).
  std::vector<cuda::DevFirstPage>& first_pages = m.first_pages;
  first_pages.clear();
  if (page_units > 0 && early_pages_) {
    first_pages.resize(units.size());
    for (size_t i = 0; i < units.size(); ++i) {
      const cuda::DevUnit& u = units[i];
      cuda::DevFirstPage& f = first_pages[i];
      f = cuda::DevFirstPage{};
      const cuda::DevSeq& d = seqs[u.seq];
      if (u.kind != cuda::kUnitPages || cuda::UnitWaitsForQuantizeAppend(d, u)) continue;
      const int64_t p0 = (u.tok_begin - (d.sink_len + d.to_sink)) / kPageTokens;
      f.k_src = pages[d.k.body_pages + p0] + int64_t{u.kv_head} * d.k.head_bytes;
      f.v_src = pages[d.v.body_pages + p0] + int64_t{u.kv_head} * d.v.head_bytes;
      f.k_bytes = d.k.head_bytes;
      f.v_bytes = d.v.head_bytes;
    }
  }
  const int64_t off_pages = Align16(int64_t(seqs.size() * sizeof(cuda::DevSeq)));
  const int64_t off_units = off_pages + Align16(int64_t(pages.size() * sizeof(int64_t)));
  const int64_t off_items = off_units + Align16(int64_t(units.size() * sizeof(cuda::DevUnit)));
  const int64_t off_fseqs = off_items + Align16(int64_t(items.size() * sizeof(cuda::DevMergeItem)));
  const int64_t off_fpages = off_fseqs + Align16(int64_t(fseqs.size() * sizeof(cuda::DevSeq)));
  const int64_t off_first = off_fpages + Align16(int64_t(fpages.size() * sizeof(int64_t)));
  // the one-block-per-head quantize-append's descriptors (QaPlan::head), the step's and the flush's
  std::vector<cuda::DevQaHead>& heads = m.heads;
  std::vector<cuda::DevQaHead>& fheads = m.fheads;
  heads.clear();
  fheads.clear();
  if (qa_plan.head) cuda::BuildQaHeads(seqs, pages, p.head_dim, &heads);
  if (flush_plan.head && !fseqs.empty()) cuda::BuildQaHeads(fseqs, fpages, p.head_dim, &fheads);
  const int64_t off_heads = off_first + Align16(int64_t(first_pages.size() * sizeof(cuda::DevFirstPage)));
  const int64_t off_fheads = off_heads + int64_t(heads.size() * sizeof(cuda::DevQaHead));
  const int64_t meta_end = off_fheads + int64_t(fheads.size() * sizeof(cuda::DevQaHead));
  m.sections = {{0, int64_t(seqs.size() * sizeof(cuda::DevSeq))},
                {off_pages, int64_t(pages.size() * sizeof(int64_t))},
                {off_units, int64_t(units.size() * sizeof(cuda::DevUnit))},
                {off_items, int64_t(items.size() * sizeof(cuda::DevMergeItem))},
                {off_fseqs, int64_t(fseqs.size() * sizeof(cuda::DevSeq))},
                {off_fpages, int64_t(fpages.size() * sizeof(int64_t))},
                {off_first, int64_t(first_pages.size() * sizeof(cuda::DevFirstPage))},
                {off_heads, int64_t(heads.size() * sizeof(cuda::DevQaHead))},
                {off_fheads, int64_t(fheads.size() * sizeof(cuda::DevQaHead))}};
  // RunStepFromHost's inputs after the descriptors, each 256-byte aligned (the kernels' 16-byte
  // loads of q and the new tokens need 16)
  auto align256 = [](int64_t x) { return (x + 255) / 256 * 256; };
  const int64_t off_q = align256(meta_end);
  const int64_t off_k = off_q + (in ? align256(in->q_bytes) : 0);
  const int64_t off_v = off_k + (in ? align256(in->kv_bytes) : 0);
  const int64_t total = in ? off_v + in->kv_bytes : meta_end;
  KVQ_RETURN_IF_ERROR(m.WaitIdle());  // the staging buffer may still feed the previous copy
  KVQ_RETURN_IF_ERROR(m.EnsureMeta(std::max<int64_t>(total, 16)));
  KVQ_RETURN_IF_ERROR(m.EnsureWorkspace(std::max<int64_t>(int64_t(units.size()), 1), p.head_dim));
  KVQ_RETURN_IF_ERROR(m.EnsureMergeCounters(std::max<int64_t>(int64_t(items.size()), 1)));
  if (!seqs.empty()) std::memcpy(m.staging, seqs.data(), seqs.size() * sizeof(cuda::DevSeq));
  if (!pages.empty()) std::memcpy(m.staging + off_pages, pages.data(), pages.size() * sizeof(int64_t));
  if (!units.empty()) std::memcpy(m.staging + off_units, units.data(), units.size() * sizeof(cuda::DevUnit));
  if (!items.empty()) std::memcpy(m.staging + off_items, items.data(), items.size() * sizeof(cuda::DevMergeItem));
  if (!fseqs.empty()) std::memcpy(m.staging + off_fseqs, fseqs.data(), fseqs.size() * sizeof(cuda::DevSeq));
  if (!fpages.empty()) std::memcpy(m.staging + off_fpages, fpages.data(), fpages.size() * sizeof(int64_t));
  if (!first_pages.empty())
    std::memcpy(m.staging + off_first, first_pages.data(), first_pages.size() * sizeof(cuda::DevFirstPage));
  if (!heads.empty()) std::memcpy(m.staging + off_heads, heads.data(), heads.size() * sizeof(cuda::DevQaHead));
  if (!fheads.empty()) std::memcpy(m.staging + off_fheads, fheads.data(), fheads.size() * sizeof(cuda::DevQaHead));
  if (in) {
    std::memcpy(m.staging + off_q, in->q, in->q_bytes);
    std::memcpy(m.staging + off_k, in->k, in->kv_bytes);
    std::memcpy(m.staging + off_v, in->v, in->kv_bytes);
  }
  KVQ_CUDA_RETURN(cudaMemcpyAsync(m.meta, m.staging, total, cudaMemcpyHostToDevice, stream));
  KVQ_RETURN_IF_ERROR(m.MarkBusy(stream));

  // The fused step runs K and V with one count, one group per warp (qa_plan.chunks <= 2 there, so
  // it flushes no along_tokens groups); the quantize-append's own launch runs the plan's grid.
  m.qa_plan = qa_plan;
  m.params = p;
  if (in) {
    m.params.q = m.meta + off_q;
    m.params.k_new = m.meta + off_k;
    m.params.v_new = m.meta + off_v;
  }
  m.num_seqs = num_seqs;
  m.flush_prepared = flush_any;
  m.flush_plan = flush_plan;
  m.num_units = static_cast<int>(units.size());
  m.num_items = static_cast<int>(items.size());
  m.chunk = static_cast<int>(chunk);
  m.decode_path = decode_path;
  // The full-precision tiles on the tensor cores only where the per-token units run beside the
  // bodies: run first and alone (at (64,32,8,8192) without bodies first, and where the few items'
  // around units are split into their own units) an mma tile took ~29,000 cycles against ~12,000
  // beside the bodies, and the launches were 0-4% slower than on the per-token path ((4,32,8,16384)
  // innerq2 0.958x; H100, raw/2026-12-07i/call2-call4).
  m.mma_tiles = mma_tiles && bodies_first;
  m.max_rows = max_rows;
  m.decode_paths = launch_paths;
  m.ring_slot_bytes = ring_slot_bytes;
  m.ring_work_bytes = ring_work_bytes;
  m.ring_stages = ring_stages;
  m.blocks_per_sm = blocks_per_sm;
  {  // PDL off where it measured slower: a quantize-append grid over more than one block per SM
     // followed by less than 1.5 waves of attention units (cuda_ops.h, set_pdl), unless the bodies
     // go first: then the units that wait for it queue behind bodies that do not ((16,32,8,32768),
     // H100: step innerq 202.7 -> 201.7 us, kivi2 259.8 -> 256.7; qa_step 10.6 -> 7.8, 10.1 -> 6.9)
    const int64_t qa_blocks = cuda::QaPlanBlocks(qa_plan, num_seqs, p.num_kv_heads);
    const bool pdl_auto =
        bodies_first || !(qa_blocks > m.num_sms && 2 * int64_t(units.size()) < 3 * resident_blocks);
    m.pdl = pdl_mode_ >= 0 ? pdl_mode_ == 1 : pdl_auto;
  }
  // One pass over the units for the rule the kernels wait by: the stats, and for a fused step the
  // check that every head's quantize-append has a unit to run it (one that waits).
  int early_units = 0, longest_waiting_unit = 0;
  std::vector<char>& owned = m.owned;
  owned.assign(fused ? size_t(num_seqs) * p.num_kv_heads : 0, 0);
  if (decode_path)
    for (const cuda::DevUnit& u : units) {
      if (!cuda::UnitWaitsForQuantizeAppend(seqs[u.seq], u)) {
        ++early_units;
        continue;
      }
      if (fused) owned[size_t(u.seq) * p.num_kv_heads + u.kv_head] = 1;
      if (u.kind == cuda::kUnitTokens && u.skip_end <= u.skip_begin)
        longest_waiting_unit = std::max(longest_waiting_unit, int(u.tok_end - u.tok_begin));
    }
  m.fused = fused && std::find(owned.begin(), owned.end(), 0) == owned.end();
  if (m.fused) KVQ_RETURN_IF_ERROR(m.EnsureItemSync(int64_t{num_seqs} * p.num_kv_heads));
  m.d_seqs = reinterpret_cast<const cuda::DevSeq*>(m.meta);
  m.d_pages = reinterpret_cast<const int64_t*>(m.meta + off_pages);
  m.d_units = reinterpret_cast<const cuda::DevUnit*>(m.meta + off_units);
  m.d_items = reinterpret_cast<const cuda::DevMergeItem*>(m.meta + off_items);
  m.d_fseqs = reinterpret_cast<const cuda::DevSeq*>(m.meta + off_fseqs);
  m.d_fpages = reinterpret_cast<const int64_t*>(m.meta + off_fpages);
  m.d_first_pages = first_pages.empty() ? nullptr : reinterpret_cast<const cuda::DevFirstPage*>(m.meta + off_first);
  m.d_heads = heads.empty() ? nullptr : reinterpret_cast<const cuda::DevQaHead*>(m.meta + off_heads);
  m.d_fheads = fheads.empty() ? nullptr : reinterpret_cast<const cuda::DevQaHead*>(m.meta + off_fheads);
  // Not after a fused step: few long sequences whose attention fills every SM, so the flush would
  // run after it, not beside it (an H100 measured 1.2-2.9 us more per step at (1,32,32,32768)
  // kivi2 / kivi4); the next step then flushes as usual.
  m.flush_after = flush_any && attention_ready && !m.fused;
  m.prepared = true;
  m.attention_ready = attention_ready;
  stats_.num_units = m.num_units;
  stats_.chunk_tokens = m.chunk;
  stats_.decode_path = decode_path;
  stats_.ring_stages = decode_path ? ring_stages : 0;
  stats_.imma_units = imma_units;
  stats_.page_units = page_units;
  stats_.mma_full = mma_full;
  stats_.kivi_mma = imma_units > 0 && kivi_family;
  stats_.kivi_codes = imma_units > 0 && kivi_family && kivi_codes;
  stats_.blocks_per_sm = blocks_per_sm;
  stats_.pdl = m.pdl && !m.fused;
  stats_.fused = m.fused;
  stats_.qa_lanes = m.qa_plan.lanes && !m.fused;
  stats_.qa_head = !m.fused && m.qa_plan.head;
  stats_.qa_wide = !m.fused && m.qa_plan.wide;
  stats_.flush_after = m.flush_after;
  stats_.row_class = decode_path ? cuda::DecodeRowClass(max_rows) : 0;
  stats_.early_units = early_units;
  stats_.bodies_first = bodies_first;
  stats_.mma_tiles = m.mma_tiles;
  stats_.longest_waiting_unit = longest_waiting_unit;
  stats_.host_prepare_us = stats_.host_launch_us = stats_.host_wait_us = 0;  // RunStepFromHost sets them
  stats_.mapped_output = false;
  return Result::Ok();
}

namespace {

cuda::QaArgs MakeQaArgs(uint8_t* arena, const StepParams& p, const cuda::DevSeq* seqs, const int64_t* pages,
                        int32_t* error_flag, int64_t* trace) {
  cuda::QaArgs a{};
  a.trace = trace;
  a.arena = arena;
  a.seqs = seqs;
  a.pages = pages;
  a.k_new = static_cast<const uint16_t*>(p.k_new);
  a.v_new = static_cast<const uint16_t*>(p.v_new);
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = p.head_dim;
  a.dtype = static_cast<int32_t>(p.dtype);
  a.error_flag = error_flag;
  return a;
}

}  // namespace

static_assert(CudaStepRunner::kQaTraceSlots == cuda::kQaTraceSlots, "the trace's slots, as step_desc.h lays them out");

static_assert(CudaStepRunner::kUnitTraceSlots == cuda::kUnitTraceSlots, "the unit trace's slots (step_desc.h)");
bool CudaStepRunner::unit_trace_built() {
#if defined(KVQ_UNIT_TRACE)
  return true;
#else
  return false;
#endif
}

int64_t CudaStepRunner::qa_trace_warps() const {
  const Impl& m = *impl_;
  return m.prepared ? cuda::QaPlanTraceWarps(m.qa_plan, m.num_seqs, m.params.num_kv_heads) : 0;
}

Result CudaStepRunner::LaunchPreparedQuantizeAppend(uint8_t* arena, cudaStream_t stream) {
  Impl& m = *impl_;
  if (!m.prepared) return Result::Error(Code::kFailedPrecondition, "no prepared batch");
  if (m.num_seqs == 0) return Result::Ok();
  if (!arena || !m.params.k_new || !m.params.v_new)
    return Result::Error(Code::kInvalidArgument, "null arena or k_new/v_new");
  const cuda::QaArgs a = MakeQaArgs(arena, m.params, m.d_seqs, m.d_pages, m.flag(), qa_trace_);
  KVQ_CUDA_RETURN(cuda::LaunchQuantizeAppend(a, m.num_seqs, m.qa_plan, m.d_heads, stream));
  KVQ_RETURN_IF_ERROR(m.MarkBusy(stream));
  return Result::Ok();
}

Result CudaStepRunner::LaunchFlush(uint8_t* arena, bool dependent, cudaStream_t stream) {
  Impl& m = *impl_;
  cuda::QaArgs a = MakeQaArgs(arena, m.params, m.d_fseqs, m.d_fpages, m.flag(), nullptr);
  a.wait_at_end = dependent ? 1 : 0;
  KVQ_CUDA_RETURN(cuda::LaunchQuantizeAppend(a, m.num_seqs, m.flush_plan, m.d_fheads, stream));
  KVQ_RETURN_IF_ERROR(m.MarkBusy(stream));
  return Result::Ok();
}

Result CudaStepRunner::LaunchPreparedFlush(uint8_t* arena, cudaStream_t stream) {
  Impl& m = *impl_;
  if (!m.prepared) return Result::Error(Code::kFailedPrecondition, "no prepared batch");
  if (!m.flush_prepared || m.num_seqs == 0) return Result::Ok();
  if (!arena || !m.params.k_new || !m.params.v_new)
    return Result::Error(Code::kInvalidArgument, "null arena or k_new/v_new");
  return LaunchFlush(arena, false, stream);
}

Result CudaStepRunner::LaunchPreparedAttention(const uint8_t* arena, cudaStream_t stream) {
  return LaunchAttentionImpl(arena, nullptr, stream);
}

Result CudaStepRunner::LaunchPreparedStep(uint8_t* arena, cudaStream_t stream) {
  Impl& m = *impl_;
  if (!m.prepared) return Result::Error(Code::kFailedPrecondition, "no prepared batch");
  if (!m.fused) {
    KVQ_RETURN_IF_ERROR(LaunchPreparedQuantizeAppend(arena, stream));
    KVQ_RETURN_IF_ERROR(LaunchPreparedAttention(arena, stream));
  } else {
    if (m.num_seqs == 0) return Result::Ok();
    if (!arena || !m.params.k_new || !m.params.v_new)
      return Result::Error(Code::kInvalidArgument, "null arena or k_new/v_new");
    const cuda::QaArgs qa = MakeQaArgs(arena, m.params, m.d_seqs, m.d_pages, m.flag(), qa_trace_);
    KVQ_RETURN_IF_ERROR(LaunchAttentionImpl(arena, &qa, stream));
  }
  // the next step's flush beside the attention: its programmatic dependent, nothing in between
  return m.flush_after ? LaunchFlush(arena, true, stream) : Result::Ok();
}

Result CudaStepRunner::LaunchAttentionImpl(const uint8_t* arena, const cuda::QaArgs* fused_qa, cudaStream_t stream) {
  Impl& m = *impl_;
  if (!m.prepared) return Result::Error(Code::kFailedPrecondition, "no prepared batch");
  if (m.num_seqs == 0) return Result::Ok();
  if (!m.attention_ready)
    return Result::Error(Code::kInvalidArgument, "attention needs n_new >= 1 for every sequence");
  if (!arena || !m.params.q || !m.params.o) return Result::Error(Code::kInvalidArgument, "null arena, q or o");
  const StepParams& p = m.params;
  const float scale = p.softmax_scale != 0.f ? p.softmax_scale : 1.f / std::sqrt(float(p.head_dim));
  cuda::AttnArgs a{};
  a.arena = arena;
  a.seqs = m.d_seqs;
  a.pages = m.d_pages;
  a.units = m.d_units;
  a.first_pages = m.d_first_pages;
  a.q = static_cast<const uint16_t*>(p.q);
  a.part_o = m.part_o;
  a.part_ml = m.part_ml;
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.scale_log2 = scale * 1.4426950408889634f;
  a.ring_slot_bytes = m.ring_slot_bytes;
  a.ring_work_bytes = m.ring_work_bytes;
  a.ring_stages = m.ring_stages;
  a.items = m.d_items;
  a.merge_count = m.merge_count;
  a.o = static_cast<uint16_t*>(p.o);
  a.pdl = m.pdl ? 1 : 0;
  a.trigger_dependents = m.flush_after && m.decode_path ? 1 : 0;
  a.mma_tiles = m.mma_tiles ? 1 : 0;
  a.sm_block_cap = 0;
  a.ring_offset = ring_offset_;
  a.unit_trace = unit_trace_;
  if (spread_blocks_ && m.decode_path && m.num_sms > 0) {  // one wave: at most ceil(units / SMs) per SM
    const int cap = (m.num_units + m.num_sms - 1) / m.num_sms;
    if (cap < m.blocks_per_sm) a.sm_block_cap = cap;
  }
  if (fused_qa) {  // the fused step (decode path): each head's first waiting unit runs its quantize-append
    a.qa = *fused_qa;
    a.fused = 1;
    a.qa_chunks = m.qa_plan.chunks;
    a.item_sync = m.item_sync;
    a.epoch = m.epoch + 1 == 0 ? 1 : m.epoch + 1;
    a.pdl = 0;  // plain: nothing before it in the stream is left to wait for on the device
    // Two fused launches of this runner must not overlap (they share the marks): on another stream
    // than the last one, this one waits for everything the runner launched before.
    if (m.fused_launched && stream != m.fused_stream) KVQ_CUDA_RETURN(cudaStreamWaitEvent(stream, m.done, 0));
  }
  if (m.decode_path) {  // the merge is fused into the decode launch
    KVQ_CUDA_RETURN(cuda::LaunchDecode(a, p.head_dim, p.dtype, m.max_rows, m.decode_paths, m.num_units, stream));
    if (fused_qa) {
      m.epoch = a.epoch;
      m.fused_stream = stream;
      m.fused_launched = true;
    }
    KVQ_RETURN_IF_ERROR(m.MarkBusy(stream));
    return Result::Ok();
  }
  if (fused_qa) return Result::Error(Code::kInternal, "fused step without the decode path");
  KVQ_CUDA_RETURN(cuda::LaunchAttention(a, p.head_dim, p.dtype, m.num_units, stream));
  cuda::MergeArgs mg{};
  mg.items = m.d_items;
  mg.seqs = m.d_seqs;
  mg.part_o = m.part_o;
  mg.part_ml = m.part_ml;
  mg.o = static_cast<uint16_t*>(p.o);
  mg.num_q_heads = p.num_q_heads;
  mg.group = a.group;
  KVQ_CUDA_RETURN(cuda::LaunchMerge(mg, p.head_dim, p.dtype, m.num_items, stream));
  KVQ_RETURN_IF_ERROR(m.MarkBusy(stream));
  return Result::Ok();
}

Result CudaStepRunner::QuantizeAppend(const StepParams& params, const SeqWork* works,
                                      const QuantConfig* configs, int num_seqs, uint8_t* arena,
                                      cudaStream_t stream) {
  KVQ_RETURN_IF_ERROR(Prepare(params, works, configs, num_seqs, stream));
  return LaunchPreparedQuantizeAppend(arena, stream);
}

Result CudaStepRunner::Attention(const StepParams& params, const SeqWork* works,
                                 const QuantConfig* configs, int num_seqs, const uint8_t* arena,
                                 cudaStream_t stream) {
  KVQ_RETURN_IF_ERROR(Prepare(params, works, configs, num_seqs, stream));
  return LaunchPreparedAttention(arena, stream);
}

Result CudaStepRunner::RunStep(const StepParams& params, const SeqWork* works,
                               const QuantConfig* configs, int num_seqs, uint8_t* arena,
                               cudaStream_t stream, const SeqWork* flush_after) {
  KVQ_RETURN_IF_ERROR(Prepare(params, works, configs, num_seqs, stream, flush_after));
  return LaunchPreparedStep(arena, stream);
}

Result CudaStepRunner::RunStepFromHost(const StepParams& params, int64_t q_bytes, int64_t kv_bytes,
                                       const SeqWork* works, const QuantConfig* configs, int num_seqs,
                                       uint8_t* arena, cudaStream_t stream, const SeqWork* flush_after) {
  Impl& m = *impl_;
  if (!params.q || !params.k_new || !params.v_new || !params.o)
    return Result::Error(Code::kInvalidArgument, "null q, k_new, v_new or o");
  if (q_bytes < 0 || kv_bytes < 0) return Result::Error(Code::kInvalidArgument, "negative q_bytes or kv_bytes");
  // the rows the works address must lie inside the given bytes
  const int64_t q_row = int64_t{params.num_q_heads} * params.head_dim * 2;
  const int64_t kv_row = int64_t{params.num_kv_heads} * params.head_dim * 2;
  for (int i = 0; i < num_seqs; ++i) {
    const SeqWork& w = works[i];
    if (w.q_row < 0 || w.kv_row < 0 || w.n_new < 0 || (w.q_row + w.n_new) * q_row > q_bytes ||
        (w.kv_row + w.n_new) * kv_row > kv_bytes)
      return Result::Error(Code::kInvalidArgument, "sequence " + std::to_string(i) +
                                                       ": its rows lie outside the given q / k / v bytes");
  }
  using Clock = std::chrono::steady_clock;
  auto us = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
  };
  const Clock::time_point t0 = Clock::now();
  KVQ_RETURN_IF_ERROR(m.EnsureOut(q_bytes));
  // Mapped: the kernels write o and the flag into out_host (pinned memory is mapped into the
  // device's address space at the same address); nothing of this runner runs now (the previous
  // step synchronized, or PrepareImpl waits for it before anything is enqueued), so the host may
  // clear the flag.
  const bool mapped = mapped_output_ && q_bytes <= kMappedOutputMaxBytes;
  Clock::time_point t1, t2;
  m.hold_records = true;
  m.held = false;
  Result r = [&]() -> Result {
    const HostInputs in{params.q, params.k_new, params.v_new, q_bytes, kv_bytes};
    KVQ_RETURN_IF_ERROR(PrepareImpl(params, works, configs, num_seqs, stream, flush_after, &in));
    uint8_t* const out = mapped ? m.out_host : m.out_dev;
    if (mapped) {
      *reinterpret_cast<volatile int32_t*>(m.out_host) = 0;
      m.launch_flag = reinterpret_cast<int32_t*>(m.out_host);
    }
    m.params.o = out + Impl::kOutOffset;
    t1 = Clock::now();
    KVQ_RETURN_IF_ERROR(LaunchPreparedStep(arena, stream));
    t2 = Clock::now();
    if (!mapped)
      KVQ_CUDA_RETURN(
          cudaMemcpyAsync(m.out_host, m.out_dev, Impl::kOutOffset + q_bytes, cudaMemcpyDeviceToHost, stream));
    KVQ_CUDA_RETURN(cudaStreamSynchronize(stream));
    return Result::Ok();
  }();
  m.hold_records = false;
  m.launch_flag = nullptr;
  stats_.mapped_output = mapped;
  if (!r.ok()) {
    // returned before the synchronization: what it enqueued may still run
    if (m.held) (void)m.MarkBusy(m.held_stream);
    return r;
  }
  m.done_recorded = false;  // the synchronization covered everything this runner enqueued
  KVQ_CUDA_RETURN(cudaGetLastError());
  int32_t flag = 0;
  std::memcpy(&flag, m.out_host, sizeof(flag));
  if (flag != 0) {
    if (mapped) *reinterpret_cast<volatile int32_t*>(m.out_host) = 0;
    return ClearErrorFlag(flag, stream);
  }
  std::memcpy(params.o, m.out_host + Impl::kOutOffset, q_bytes);
  stats_.host_prepare_us = us(t0, t1);
  stats_.host_launch_us = us(t1, t2);
  stats_.host_wait_us = us(t2, Clock::now());
  return Result::Ok();
}

std::vector<uint8_t> CudaStepRunner::PreparedDescriptors() const {
  const Impl& m = *impl_;
  std::vector<uint8_t> out;
  if (!m.prepared) return out;
  for (const auto& [off, bytes] : m.sections) out.insert(out.end(), m.staging + off, m.staging + off + bytes);
  return out;
}

Result CudaStepRunner::ClearErrorFlag(int32_t flag, cudaStream_t stream) {
  Impl& m = *impl_;
  KVQ_CUDA_RETURN(cudaMemsetAsync(m.error_flag, 0, sizeof(int32_t), stream));
  KVQ_CUDA_RETURN(cudaStreamSynchronize(stream));
  return Result::Error(Code::kInvalidArgument,
                       flag == 2 ? "a flushed value is not finite, or a quantization scale or zero is beyond fp16 range"
                                 : "a kernel saw an invalid page");
}

Result CudaStepRunner::Synchronize(cudaStream_t stream) {
  Impl& m = *impl_;
  KVQ_CUDA_RETURN(cudaMemcpyAsync(m.error_host, m.error_flag, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  KVQ_CUDA_RETURN(cudaStreamSynchronize(stream));
  KVQ_CUDA_RETURN(cudaGetLastError());
  if (*m.error_host != 0) {
    const int32_t flag = *m.error_host;
    *m.error_host = 0;
    return ClearErrorFlag(flag, stream);
  }
  return Result::Ok();
}

}  // namespace kvq
