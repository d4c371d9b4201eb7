// Flattened, device-resident description of a batched step (plain structs shared by the host
// runner and the kernels). The host builds these in pinned memory and copies them in one go.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvq/cache.h"
#include "kvq/format.h"

namespace kvq {
namespace cuda {

// Query rows per attention unit (rows = (query token, query head of the KV head's group)).
constexpr int kRowsPerUnit = 8;
// Rows per unit rounded up to the decode kernel's instantiated classes (decode.cuh).
__host__ __device__ constexpr int DecodeRowClass(int rows) { return rows <= 1 ? 1 : rows <= 4 ? 4 : kRowsPerUnit; }
constexpr int kTileTokens = 32;    // tokens per attention tile
constexpr int kAttnThreads = 128;
// quantize-append: 2 warps a block, one group per warp at a time. At 256 threads its blocks took
// 3-6 us more of a decode step (the chain's qa_step on an H100: (1,32,32,4096) innerq 6.8 -> 4.9 us,
// kivi4 7.2 -> 4.6, (64,32,8,8192) kivi2 14.9 -> 10.0, innerq 19.5 -> 15.7, two runs). Why is not
// measured; a guess: a 256-thread block finds no registers beside the resident attention blocks.
constexpr int kQaThreads = 64;

// One tensor stream (K or V) of one sequence, state at the start of the step plus its format.
struct DevTensor {
  int64_t sink_page;        // arena offset of the [Hkv][kPageTokens][D] sink page, -1 if none
  int32_t body_len;         // quantized tokens at step start
  int32_t win_first;        // slot of the first window token in win page 0
  int32_t win_len;          // window tokens at step start
  int32_t flush;            // window tokens flushed into the body at the start of this step
  int32_t body_pages;       // first entry in the page table
  int32_t win_pages;        // first entry in the page table
  int32_t num_body_pages;
  int32_t num_win_pages;
  // format
  int32_t mode;             // QuantMode
  int32_t bits;
  int32_t grouping;         // Grouping
  int32_t group_size;
  int32_t words_per_group;
  int32_t scales_offset;    // bytes from the head's start in a body page
  int32_t zeros_offset;
  int32_t head_bytes;
  int32_t has_zeros;
};

struct DevSeq {
  DevTensor k, v;
  int64_t norm_offset;      // float [Hkv][D], -1 when key_norm is off
  int64_t kv_row;
  int64_t q_row;
  int32_t sink_len;         // at step start
  int32_t sink_cap;         // S of the config
  int32_t n_new;
  int32_t to_sink;          // new tokens that go to the sink
  int32_t compute_norm;
  int32_t key_norm;
  int32_t length;           // total tokens after the step (sink + body + window)
  int32_t pad;
};

// One split-KV work unit: a KV head, up to kRowsPerUnit query rows and a token range.
struct DevUnit {
  int32_t seq;
  int32_t kv_head;
  int32_t row0;             // first row (row = query_index * g + head_in_group)
  int32_t num_rows;
  int32_t tok_begin;
  int32_t tok_end;
  int32_t kind;             // kUnitTokens, or kUnitImmaBody (decode_imma.cuh)
  int32_t skip_begin;       // kUnitTokens of the decode path: tokens [skip_begin, skip_end) are
  int32_t skip_end;         // left to the item's kUnitImmaBody units (32-aligned; empty: 0, 0)
  int32_t part;             // decode path: index of the unit's partial (o, m, l) (launch order may differ)
  int32_t item;             // its merge item
};
// Unit kinds: any tokens (the per-token / per-tile paths), or only whole 32-token tiles inside both
// the K and the V body, on the tensor cores: of an InnerQ-layout sequence (K along_channels, V
// along_tokens, G = 32) with 2 to 4 rows, bits (K, V) (2, 2), (3, 2), (3, 3) (decode_imma.cuh); or
// of a KIVI-layout sequence (K along_tokens, V along_channels, G = 32) with 2 to 8 rows, bits
// (2, 2) and (4, 4) (decode_mma_kivi.cuh). Or, kUnitPages, with 1 to 4 rows: whole body pages of K
// and V of an InnerQ-layout sequence (tok_begin on a page, a multiple of kPageTokens tokens) of the
// IMMA bits, which the unit reads as they are, nothing past them (decode_pages.cuh).
constexpr int32_t kUnitTokens = 0, kUnitImmaBody = 1, kUnitPages = 2;
constexpr int kImmaMaxRows = 4;
// Whether the quantize-append's lane instance flushes this tensor's groups one per lane
// (FlushLaneGroups: along_tokens groups of 32); KVQ_HD so the plan counts what the kernel does.
KVQ_HD bool LaneFlush(const DevTensor& x) {
  return x.grouping == static_cast<int32_t>(Grouping::kAlongTokens) && x.group_size == 32;
}

KVQ_HD bool ImmaBits(int k_bits, int v_bits) {
  return (k_bits == 2 && v_bits == 2) || (k_bits == 3 && v_bits == 2) || (k_bits == 3 && v_bits == 3);
}
KVQ_HD bool KiviMmaBits(int k_bits, int v_bits) { return k_bits == v_bits && (k_bits == 2 || k_bits == 4); }

// The token ranges (numbered as after the step, 0 .. length - 1) that the step's quantize-append
// writes: the new sink tokens [sink_len, sink_len + to_sink), each tensor's flushed body tokens
// [b0 + body_len, b0 + body_len + flush) (b0 = sink_len + to_sink) and the new window tokens at the
// end. Everything else the attention reads (q, the key-norm factors, the older body and window
// tokens, the page table) was complete before the quantize-append started: it neither moves nor
// rewrites them. KVQ_HD so the host plan counts what the kernels decide.
KVQ_HD bool RangeMeetsStepWrites(const DevSeq& s, int begin, int end) {
  auto meets = [&](int b, int e) { return b < e && begin < e && b < end; };
  const int b0 = s.sink_len + s.to_sink;
  if (meets(s.sink_len, b0)) return true;
  if (meets(s.length - (s.n_new - s.to_sink), s.length)) return true;
  const DevTensor* xs[2] = {&s.k, &s.v};
  for (const DevTensor* x : xs)
    if (x->flush > 0 && x->mode != static_cast<int32_t>(QuantMode::kFull) &&
        meets(b0 + x->body_len, b0 + x->body_len + x->flush))
      return true;
  return false;
}
// The first token at or after which a range [begin, end) meets the step's writes: the range meets
// them exactly when end > FirstStepWriteFrom(s, begin) (the ranges of RangeMeetsStepWrites; INT_MAX
// when none lies past begin). The host plan walks long sequences with it in one step.
KVQ_HD int FirstStepWriteFrom(const DevSeq& s, int begin) {
  int w = 0x7fffffff;
  auto from = [&](int b, int e) {
    if (b < e && begin < e) w = b < w ? b : w;
  };
  const int b0 = s.sink_len + s.to_sink;
  from(s.sink_len, b0);
  from(s.length - (s.n_new - s.to_sink), s.length);
  const DevTensor* xs[2] = {&s.k, &s.v};
  for (const DevTensor* x : xs)
    if (x->flush > 0 && x->mode != static_cast<int32_t>(QuantMode::kFull)) from(b0 + x->body_len, b0 + x->body_len + x->flush);
  return w;
}
// Whether an attention unit must wait for the quantize-append grid before its reads (decode path,
// launched as a programmatic dependent): its tiles run from tok_begin in steps of 32 tokens, whole
// tiles staged or loaded even where tok_end cuts the last one, so its reads span
// [tok_begin, tok_begin + 32 * ceil(tokens / 32)); one more tile of margin. The other units (the
// older body, most of a long sequence) start while the quantize-append still runs.
KVQ_HD bool UnitWaitsForQuantizeAppend(const DevSeq& s, const DevUnit& u) {
  if (u.kind == kUnitPages) return RangeMeetsStepWrites(s, u.tok_begin, u.tok_end);  // no tile margin
  const int tiles_end = u.tok_begin + (u.tok_end - u.tok_begin + kTileTokens - 1) / kTileTokens * kTileTokens;
  return RangeMeetsStepWrites(s, u.tok_begin, tiles_end + kTileTokens);
}

// One (sequence, KV head, row block): the units [unit0, unit0 + num_units) that the merge combines.
struct DevMergeItem {
  int32_t seq;
  int32_t kv_head;
  int32_t row0;
  int32_t num_rows;
  int32_t unit0;
  int32_t num_units;
};

struct QaArgs {
  uint8_t* arena;
  const DevSeq* seqs;
  const int64_t* pages;
  const uint16_t* k_new;    // [rows, Hkv, D]
  const uint16_t* v_new;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t dtype;            // DType
  int32_t* error_flag;      // set non-zero on an out-of-range page or an fp16 scale overflow
  // Benchmark only (null otherwise): kQaTraceSlots stamps per warp of the grid, written by lane 0
  // of each warp; QaTraceWarps(grid) warps. Its own kernel instance (QuantizeAppendKernel<true>);
  // the fused step's quantize-append is not traced.
  int64_t* trace;
  // Launched as a programmatic dependent of the kernel before it in the stream (a flush-only batch
  // after a step's attention, CudaStepRunner::RunStep's flush_after): it reads and writes
  // nothing that kernel touches, so it runs beside it and waits for it only at its end, so that its
  // completion still implies that kernel's (the next step relies on both being done).
  int32_t wait_at_end;
  // QuantizeAppendKernel's grid: its first k_chunks blocks per (sequence, KV head) are K's, the
  // rest V's (QaPlan). In the struct's tail padding: AttnArgs (which holds a QaArgs) keeps its
  // layout, and the fused step, which runs K and V with one count (AttnArgs::qa_chunks), ignores it.
  int32_t k_chunks;
};
static_assert(sizeof(QaArgs) == 80, "QaArgs::k_chunks must stay in the tail padding (AttnArgs' layout)");

// The quantize-append's phase stamps per warp (CudaStepRunner::set_qa_trace): [0] global timer
// (ns) at the block's start, [1] SM clock at the start, [2] once the flush decision is read (the
// step descriptors loaded), [3] once the warp's first flushed group's window values arrived, [4]
// after that group's quantizer, [5] after its codes, scale and zero were stored, [6] at the end
// (after the append), [7] global timer at the end, [8] the SM, [9] flush tasks the warp ran (a group
// each, or 32 groups each in the lane instance's along_tokens flushes). Slots
// 3-5 stay 0 for a warp that flushes nothing.
constexpr int kQaTraceSlots = 10;
// grid_z: the launch's blocks per (sequence, KV head), QaGrid's z; the stamps of block (s, h, z)
// start at warp ((s * num_kv_heads + h) * grid_z + z) * (kQaThreads / 32).
// QuantizeAppendHeadKernel's stamps: block (s, h) of W warps starts at warp (s * num_kv_heads + h) * W.
inline int64_t QaTraceWarps(int num_seqs, int num_kv_heads, int grid_z) {
  return int64_t{num_seqs} * num_kv_heads * grid_z * (kQaThreads / 32);
}

// Decode path, a page unit that does not wait for the quantize-append: its first page's two runs
// (K and V of the unit's head), so that the block issues that page's copies as it starts, before
// its unit and sequence descriptors and the page table have come in (three dependent loads from
// DRAM fewer ahead of the first page). k_bytes = 0: none (other units).
struct DevFirstPage {
  int64_t k_src;    // arena offsets of the runs
  int64_t v_src;
  int32_t k_bytes;  // their lengths (DevTensor::head_bytes)
  int32_t v_bytes;
  int32_t pad[2];
};

struct AttnArgs {
  const uint8_t* arena;
  const DevSeq* seqs;
  const int64_t* pages;
  const DevUnit* units;
  const DevFirstPage* first_pages;  // [units] in launch order, or null (CudaStepRunner::set_early_pages)
  const uint16_t* q;        // [rows, Hq, D]
  float* part_o;            // [units][kRowsPerUnit][D]
  float* part_ml;           // [units][kRowsPerUnit][2] (max in log2 units, sum)
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group;            // Hq / Hkv
  float scale_log2;         // softmax_scale * log2(e)
  // Decode fast path: each warp's ring of ring_stages shared-memory slots of ring_slot_bytes
  // (a whole body tile of K and of V, BodyTileBytes each) that cp.async fills ahead of the compute.
  int32_t ring_slot_bytes;
  int32_t ring_stages;      // 2 or 3 (KIVI tensor-core units: up to 6)
  // KIVI tensor-core units (decode_mma_kivi.cuh): after each warp's ring, a work area of this many
  // bytes (a dequantized [32][D] tile); 0 otherwise
  int32_t ring_work_bytes;
  // Decode path, merge fused into the launch: each unit counts itself in merge_count[item] after
  // writing its partial; the item's last unit merges all of them into o and resets the count.
  const DevMergeItem* items;
  int32_t* merge_count;     // [items], zero between launches
  uint16_t* o;              // [rows, Hq, D]
  // Host side only: launch the attention kernel as a programmatic dependent of the kernel before
  // it in the stream (the quantize-append), so its blocks are launched and resident while that
  // kernel finishes; they wait (GridDependencyWait) before reading anything it writes.
  int32_t pdl;
  // Host side only, decode path: when > 0, the launch asks for enough (unused) dynamic shared
  // memory that no SM can hold more than this many of its blocks (CudaStepRunner::set_spread_blocks).
  int32_t sm_block_cap;
  // Decode path: the rings start this many bytes past the (128-byte aligned) dynamic shared memory;
  // 0 but for the alignment experiment (CudaStepRunner::set_ring_offset)
  int32_t ring_offset;
  // Decode path, the fused step (CudaStepRunner::set_fused_step): no quantize-append launch before
  // this one. Per (sequence, KV head) the first unit that must wait (UnitWaitsForQuantizeAppend) to
  // claim it (item_sync[2 (seq * Hkv + h)] set to epoch) runs that head's quantize-append blocks (K
  // and V, qa_chunks each) itself, then marks it done (item_sync[... + 1] = epoch); the head's other
  // waiting units wait for that mark. An owner is running when it claims, so every wait ends; units
  // that do not wait read what was complete before. epoch: a per-runner launch count, never 0 (the
  // counters start at 0). fused = 0: the quantize-append ran as its own launch.
  QaArgs qa;
  int32_t fused;
  // Decode path: each unit lets a programmatic dependent launch once it no longer waits for the
  // quantize-append (RunStep's flush_after): the next step's flush, which must not start
  // before this step's append is complete, then runs beside the attention's later units.
  int32_t trigger_dependents;
  int32_t qa_chunks;
  uint32_t* item_sync;      // [num_seqs * num_kv_heads][2], device memory
  uint32_t epoch;
  // Decode path: the per-token units' tiles in full precision for both tensors (the sink, the
  // windows) on the tensor cores where the instance has them (MmaTokTiles; CudaStepRunner::set_mma_tiles).
  int32_t mma_tiles;
  // Benchmark only (null otherwise; last, so that the fields above keep their offsets): the decode
  // units' phase stamps, kUnitTraceSlots per block in launch order, written only by kernels built
  // with KVQ_UNIT_TRACE (cmake -DKVQ_UNIT_TRACE=ON; CudaStepRunner::set_unit_trace).
  int64_t* unit_trace;
};

// The decode units' phase stamps (global timer, ns) per block: [0] the block's SM | kind << 8 |
// waited for the quantize-append << 12 | merged its item << 13 | tokens (not counting the
// body it steps over) << 16, [1] at the start,
// [2] once the unit and its sequence's descriptor are loaded, [3] after any wait for the
// quantize-append, [4] page units: once the first page has landed (warp 0; else 0), [5] at the
// epilogue's start (the body done), [6] once the partial is written and counted, [7] the merging
// unit: once the item is merged (else 0). Per-token tiles (the per-token loop of any unit, its
// warps' sums, SM cycles): [8] the key scores (locations, loads, products), [9] the softmax, [10]
// the value locations, [11] the values' loads and products, [12] the tiles counted; the
// full-precision tiles on the tensor cores (MmaTokTiles): [13] their SM cycles, [14] their count.
constexpr int kUnitTraceSlots = 16;

// Bytes of one 32-token body tile of a G = 32 tensor: codes (32 tokens x D codes of `bits`),
// then D/32 or D fp16 scales per tile (2D bytes either way), then as many zeros.
KVQ_HD int BodyTileBytes(int head_dim, int bits, bool has_zeros) {
  return 4 * head_dim * bits + 2 * head_dim + (has_zeros ? 2 * head_dim : 0);
}
// The KIVI code units (decode_kivi_codes.cuh): a ring slot holds the K body tile as stored (codes,
// scales, zeros) and the V body tile with its codes padded by kKiviVPad bytes per 128 (KiviCodesPad).
// 32, not 16: every 32-byte sector of the copy then lands in one 32-byte unit of shared memory (a
// sector split over two was fetched from L2 twice: the decode rings' alignment, docs/gpu_notes.md),
// and the lanes' reads of 4 tokens still hit different banks.
constexpr int kKiviVPad = 32;
KVQ_HD int KiviCodesPad(int code_bytes) { return code_bytes + code_bytes / 128 * kKiviVPad; }
KVQ_HD int KiviCodesSlotBytes(int head_dim, int k_bits, int v_bits) {
  return 4 * head_dim * k_bits + 4 * head_dim + KiviCodesPad(4 * head_dim * v_bits) + 4 * head_dim;
}
// The stored layout of one KV head in a body page of a tensor the KIVI code units read (asym, groups
// of 32, `bits` bits; MakeStreamLayout): 16 D bits bytes of codes (4 D groups of `bits` words), then
// 4 D fp16 scales, then as many zeros. The units' staging takes these as constants; the plan gives
// the units only tensors whose descriptors say the same (KiviCodesLayout).
KVQ_HD int KiviHeadScalesOffset(int head_dim, int bits) { return 16 * head_dim * bits; }
KVQ_HD int KiviHeadZerosOffset(int head_dim, int bits) { return 16 * head_dim * bits + 8 * head_dim; }
KVQ_HD int KiviHeadBytes(int head_dim, int bits) { return 16 * head_dim * bits + 16 * head_dim; }
KVQ_HD bool KiviCodesLayout(const DevTensor& x, int head_dim) {
  return x.group_size == 32 && x.words_per_group == x.bits && x.has_zeros != 0 &&
         x.scales_offset == KiviHeadScalesOffset(head_dim, x.bits) &&
         x.zeros_offset == KiviHeadZerosOffset(head_dim, x.bits) && x.head_bytes == KiviHeadBytes(head_dim, x.bits);
}
constexpr int kDecRingWarps = 4;  // warps per decode block, each with its own ring
// InnerQ page units (decode_pages.cuh): a block's ring slot holds one KV head's part of a
// K body page and of a V body page (head_bytes each, 16-byte multiples), laid out as kDecRingWarps
// "warp slots" of PageSlotBytes so that DecodeRingBytes sizes it; the ring's mbarriers (one per
// stage, 8 bytes) and its per-slot counts of warps done take the warps' work areas after the slots.
KVQ_HD int PageSlotBytes(int64_t k_head_bytes, int64_t v_head_bytes) {
  return static_cast<int>(((k_head_bytes + v_head_bytes + kDecRingWarps - 1) / kDecRingWarps + 15) / 16 * 16);
}
constexpr int kPageWorkBytes = 32;
KVQ_HD int DecodeWarpRingBytes(const AttnArgs& a) { return a.ring_stages * a.ring_slot_bytes + a.ring_work_bytes; }
// A decode launch's dynamic shared memory: the warps' rings after ring_offset bytes. The plan sizes
// its occupancy probes and the launch its allocation with this one formula.
inline int DecodeRingBytes(int stages, int slot_bytes, int work_bytes, int ring_offset) {
  return kDecRingWarps * (stages * slot_bytes + work_bytes) + ring_offset;
}
inline int DecodeRingBytes(const AttnArgs& a) {
  return DecodeRingBytes(a.ring_stages, a.ring_slot_bytes, a.ring_work_bytes, a.ring_offset);
}

struct MergeArgs {
  const DevMergeItem* items;
  const DevSeq* seqs;
  const float* part_o;
  const float* part_ml;
  uint16_t* o;              // [rows, Hq, D]
  int32_t num_q_heads;
  int32_t group;
};

// The batch as the kernels see it: one DevSeq per sequence and the page table they index, with
// every check on the works (the first half of CudaStepRunner::Prepare; host code, which the CPU
// emulation of the quantize-append in tests/kernels_gpu uses too). attention_ready: every
// sequence has n_new >= 1.
Result FlattenBatch(const StepParams& p, const SeqWork* works, const QuantConfig* configs, int num_seqs,
                    std::vector<DevSeq>* seqs, std::vector<int64_t>* pages, bool* attention_ready);

// One block per (sequence, KV head) for the whole quantize-append of a step (QaPlan::head):
// per (sequence, tensor), what the step's flush and append touch, with the page-table lookups done
// on the host, so that a flushing warp's first dependent load is its window values (the per-tensor
// grid's warps load the sequence's descriptor, then the page table, then the values: ~1,100 of
// their ~6,500 cycles at (16,32,32,4096) innerq went to the descriptor alone). Offsets are head
// 0's: head h's rows lie h * kPageTokens * D * 2 bytes further in a full-precision page
// (FullTokenOffset), its body data h * head_bytes further in a body page. Steps it covers
// (QaHeadFits): one new token or none per sequence, each tensor flushing nothing or one token of
// along_channels groups of 32, no key-norm factors to compute: every decode step of the presets
// but the along_tokens flush every 32 or 128 steps.
struct DevQaHead {
  int64_t flush_src;      // arena offset of the flushed token's row (head 0) in its window page
  int64_t flush_dst;      // arena offset of the body page it is quantized into
  int64_t append_dst;     // arena offset of the new token's row (head 0) in its sink or window page
  int64_t norm;           // arena offset of the key-norm factors (float [Hkv][D]), -1: none
  int32_t groups;         // flush groups per head (D / 32), 0: no flush
  int32_t group0;         // the flushed token's first group in the body page (slot * D / 32)
  int32_t append_row;     // row of k_new / v_new, -1: nothing appended
  int32_t bits;
  int32_t mode;           // QuantMode
  int32_t words_per_group;
  int32_t scales_offset;  // bytes from the head's start in a body page
  int32_t zeros_offset;
  int32_t head_bytes;
  int32_t has_zeros;
  int32_t pad[2];
};
static_assert(sizeof(DevQaHead) % 16 == 0, "DevQaHead: 16-byte multiples in the staging buffer");
// QuantizeAppendHeadKernel's argument.
struct QaHeadArgs {
  QaArgs qa;
  const DevQaHead* heads;  // [num_seqs][2]
};
// QuantizeAppendHeadKernel's warps, and flush groups per warp (the plan's limit). Four warps, one
// group each at D = 128, measured faster than two at every benchmark shape (H100, 2026-12-07,
// bench/results/raw/2026-12-07b/call2), so two are not built.
constexpr int kQaHeadWarps = 4;
constexpr int kQaHeadGroupsPerWarp = 2;
// Whether one block per (sequence, KV head) covers the step's quantize-append.
bool QaHeadFits(const std::vector<DevSeq>& seqs, int head_dim);
// The per-(sequence, tensor) descriptors of such a step: [num_seqs][2] (K, V), from the flattened
// batch and its page table.
void BuildQaHeads(const std::vector<DevSeq>& seqs, const std::vector<int64_t>& pages, int head_dim,
                  std::vector<DevQaHead>* heads);

// The quantize-append grid of a flattened batch. chunks: blocks per (sequence, KV head, tensor)
// with one count for K and V and one warp per flush group (the fused step's, AttnArgs::qa_chunks);
// k_chunks / v_chunks: the quantize-append's own launch, each tensor with the blocks its largest
// flush needs (K's every-step one-token flush is 4 groups at D = 128, V's along_tokens flush 128:
// one count for both started 64 blocks of K per head that only read their descriptors) and, with
// lanes, along_tokens groups of 32 one per lane, 32 per warp (QuantizeAppendBlock's kLanes);
// lanes: the batch flushes at least min_lane_groups such groups (summed over its sequences, per
// KV head; < 0: never); key_norm: KeyNormKernel runs first (some sequence computes its key-norm
// factors this step).
// head: the step's quantize-append runs as one block per (sequence, KV head)
// (QuantizeAppendHeadKernel, DevQaHead; where the caller asks for it and QaHeadFits), else the
// grid above.
// wide: the launch's kernels prefer the SM's largest shared-memory carveout (CudaStepRunner::
// set_qa_wide_carveout), so that an SM they start on keeps room for the attention's blocks.
// hybrid: some tensor flushes hybrid groups this step (the per-head kernel's instance that sums
// their errors four loads at a time).
struct QaPlan {
  int chunks = 1;
  int k_chunks = 1;
  int v_chunks = 1;
  bool lanes = false;
  bool key_norm = false;
  bool head = false;
  bool wide = false;
  bool hybrid = false;
};
QaPlan PlanQuantizeAppend(const std::vector<DevSeq>& seqs, int head_dim, int64_t min_lane_groups, bool head = false);
// Blocks of the planned quantize-append launch (KeyNormKernel's aside), and its warps (the trace's).
int64_t QaPlanBlocks(const QaPlan& plan, int num_seqs, int num_kv_heads);
int64_t QaPlanTraceWarps(const QaPlan& plan, int num_seqs, int num_kv_heads);
// Resident blocks per SM of the quantize-append's per-warp instance (occupancy API, per device).
int QuantizeAppendBlocksPerSm();
// Lanes only where the per-warp flush would take more than this many waves of the device's
// resident quantize-append warps: a lane quantizes its 32 values alone, so a warp's task is longer
// and runs ~14,000 instructions of straight code, which few warps per SM fetch for themselves. H100
// (2026-12-07, bench/results/raw/2026-12-07a/call1): qa_step 1.1-1.5 us lower at 21 waves
// ((16,32,32,4096), (64,32,8,8192)), 0.5-1.1 us higher at 5 waves ((16,32,8,32768) innerq,
// (1,32,32,*)) and 2.8 us at (1,9,3,8192) innerq.
constexpr int kQaLaneWaves = 8;

// Launchers (one .cu per instantiation group). They return the launch error, never abort.
// The quantize-append as planned (QaPlan: K's and V's blocks per (sequence, KV head), the lane
// instance, KeyNormKernel first); args.k_chunks is set from the plan.
// heads: the step's DevQaHead array in device memory where plan.head (else unused).
cudaError_t LaunchQuantizeAppend(const QaArgs& args, int num_seqs, const QaPlan& plan, const DevQaHead* heads,
                                 cudaStream_t stream);
// The quantize-append kernels' preferred shared-memory carveout (percent of the SM's maximum, or
// cudaSharedmemCarveoutDefault = -1): an SM holds blocks of one carveout at a time. Not the
// instances of QaPlan::wide launches, which keep the largest.
cudaError_t SetQuantizeAppendCarveout(int percent);
// The quantize-append grid: (sequence, KV head, K's chunks then V's).
inline dim3 QaGrid(int num_seqs, int num_kv_heads, int k_chunks, int v_chunks) {
  return dim3(num_seqs, num_kv_heads, k_chunks + v_chunks);
}
// Blocks per (sequence, KV head, tensor) for a flush of at most max_groups groups per head.
inline int QaChunks(int64_t max_groups) {
  const int64_t warps = kQaThreads / 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>((max_groups + warps - 1) / warps, 1), 64));
}
cudaError_t LaunchAttention(const AttnArgs& args, int head_dim, DType dtype, int num_units,
                            cudaStream_t stream);
cudaError_t LaunchAttentionF16D64(const AttnArgs& args, int num_units, cudaStream_t stream);
cudaError_t LaunchAttentionF16D128(const AttnArgs& args, int num_units, cudaStream_t stream);
cudaError_t LaunchAttentionBF16D64(const AttnArgs& args, int num_units, cudaStream_t stream);
cudaError_t LaunchAttentionBF16D128(const AttnArgs& args, int num_units, cudaStream_t stream);
// Resident attention blocks per SM (occupancy), for the split-KV plan.
int AttentionBlocksPerSm(int head_dim, DType dtype);
int AttentionBlocksPerSmF16D64();
int AttentionBlocksPerSmF16D128();
int AttentionBlocksPerSmBF16D64();
int AttentionBlocksPerSmBF16D128();
// Decode fast path (decode.cuh): `rows` = the most query rows of any unit (<= kRowsPerUnit);
// `paths` = the DecodePath bits the batch needs (the kernel family is chosen from them).
cudaError_t LaunchDecode(const AttnArgs& args, int head_dim, DType dtype, int rows, int paths,
                         int num_units, cudaStream_t stream);
int DecodeBlocksPerSm(int head_dim, DType dtype, int rows, int paths, int ring_bytes);
cudaError_t LaunchDecodeF16D64(const AttnArgs& args, int rows, int paths, int num_units, cudaStream_t stream);
cudaError_t LaunchDecodeF16D128(const AttnArgs& args, int rows, int paths, int num_units, cudaStream_t stream);
cudaError_t LaunchDecodeBF16D64(const AttnArgs& args, int rows, int paths, int num_units, cudaStream_t stream);
cudaError_t LaunchDecodeBF16D128(const AttnArgs& args, int rows, int paths, int num_units, cudaStream_t stream);
int DecodeBlocksPerSmF16D64(int rows, int paths, int ring_bytes);
int DecodeBlocksPerSmF16D128(int rows, int paths, int ring_bytes);
int DecodeBlocksPerSmBF16D64(int rows, int paths, int ring_bytes);
int DecodeBlocksPerSmBF16D128(int rows, int paths, int ring_bytes);
// DecodePath bits (decode.cuh): along_channels K, along_tokens K, along_tokens V, along_channels V.
constexpr int kDecodePathKCh = 1, kDecodePathKTok = 2, kDecodePathVTok = 4, kDecodePathVCh = 8;
// Not a path: set in the `paths` argument of LaunchDecode / DecodeBlocksPerSm when the batch runs
// on the tensor cores: InnerQ body units (the InnerQ 4-row instance built for them), KIVI body
// units (decode_mma_kivi.cuh, 4- and 8-row instances) or, on the fp16 family, every unit
// (decode_mma.cuh).
constexpr int kDecodeImmaUnits = 16;
// Not a path either: with kDecodeImmaUnits on the KIVI family, the body units multiply the packed
// codes on the tensor cores (decode_kivi_codes.cuh; 1-, 4- and 8-row instances) instead of
// dequantizing each tile (decode_mma_kivi.cuh).
constexpr int kDecodeKiviCodeUnits = 32;
constexpr int kDecodeUnitBits = kDecodeImmaUnits | kDecodeKiviCodeUnits;
// The batch runs the InnerQ kernel family (every quantized tensor K along_channels / V along_tokens).
inline bool DecodeFamilyIsInnerQ(int paths) {
  paths &= ~kDecodeUnitBits;
  return paths != 0 && (paths & ~(kDecodePathKCh | kDecodePathVTok)) == 0;
}
// The batch runs the KIVI kernel family (every quantized tensor K along_tokens / V along_channels).
inline bool DecodeFamilyIsKivi(int paths) {
  paths &= ~kDecodeUnitBits;
  return paths != 0 && (paths & ~(kDecodePathKTok | kDecodePathVCh)) == 0;
}
// The batch runs the fp16 kernel family (every token of every sequence in full precision).
inline bool DecodeFamilyIsFull(int paths) { return (paths & ~kDecodeUnitBits) == 0; }
cudaError_t LaunchMerge(const MergeArgs& args, int head_dim, DType dtype, int num_items,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace kvq
