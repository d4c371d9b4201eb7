// Host API of the CUDA kernels (no gRPC, no protobuf): a batched step of one layer on the GPU.
//
// The arena, q/k_new/v_new and o are device memory; SeqWork page arrays are host pointers (as the
// planner produces them). CudaStepRunner flattens a batch into one pinned staging buffer, copies it
// to the device with one async copy, plans the split-KV work and its workspace (the kernels never
// allocate), and launches on the caller's stream. Every CUDA error comes back as a kvq::Result.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>
#include <string>

#include "kvq/cache.h"
#include "kvq/format.h"

namespace kvq {
namespace cuda {
struct QaArgs;  // kernels/cuda/step_desc.h
}  // namespace cuda

// Which kernel serves a step (the one selector for "supported" and "which kernel"): returns ""
// when every sequence of the batch is supported, else the reason. head_dim 64 or 128, fp16/bf16,
// every QuantConfig that ValidateConfig accepts with bits 2, 3 or 4.
std::string CudaSupports(const StepParams& params, const QuantConfig* configs, int num_seqs);

struct CudaStepStats {
  int num_units = 0;     // split-KV work units of the last attention launch
  int chunk_tokens = 0;  // tokens per unit (the split size)
  bool decode_path = false;  // the last attention plan took the decode fast path (decode.cuh)
  int ring_stages = 0;       // decode path: body tiles per warp ring (kept in flight: ring_stages - 1)
  int blocks_per_sm = 0;     // resident attention blocks per SM the split plan assumed
  int imma_units = 0;        // units of InnerQ body tiles on the tensor cores (decode_imma.cuh)
  int page_units = 0;        // InnerQ units of whole body pages by bulk copies (decode_pages.cuh)
  bool mma_full = false;     // fp16 batch: every unit on the fp16 / bf16 tensor cores (decode_mma.cuh)
  bool kivi_mma = false;     // the imma_units are KIVI body units on the fp16 / bf16 tensor cores
                             // (decode_mma_kivi.cuh or, with kivi_codes, decode_kivi_codes.cuh)
  bool kivi_codes = false;   // those KIVI units multiply the packed codes (decode_kivi_codes.cuh)
  bool pdl = false;          // the attention launches as a programmatic dependent (set_pdl)
  bool fused = false;        // decode path: the step's quantize-append ran inside the attention
                             // launch (set_fused_step); then pdl is false
  int row_class = 0;         // decode path: query rows of the kernel instance (1, 4 or 8)
  int early_units = 0;       // decode path: units that read nothing the step's quantize-append
                             // writes, so with PDL they run while it runs (UnitWaitsForQuantizeAppend)
  bool bodies_first = false;  // decode path: the body units came first in the grid (set_bodies_first)
  bool mma_tiles = false;     // decode path: the launch asked for the per-token units' full-precision
                              // tiles on the tensor cores (set_mma_tiles: where the bodies go first)
  int longest_waiting_unit = 0;  // decode path: tokens of the longest per-token unit that waits (units
                                 // that step over a body not counted)
  bool flush_after = false;  // the step launches the next step's flush after its attention (Prepare's
                             // flush_after, when it flushes something and the step is not fused)
  bool qa_lanes = false;     // the step's own quantize-append launch flushes along_tokens groups of
                             // 32 one per lane (set_qa_lanes, and some are flushed this step)
  bool qa_head = false;      // the step's own quantize-append launch ran one block per (sequence, KV
                             // head) (set_qa_head); false: its per-tensor grid
  bool qa_wide = false;      // that launch asked for kernels at the largest shared-memory carveout
                             // (set_qa_wide_carveout; the plain ones run where it cannot be set)
  // RunStepFromHost's host wall time in its three phases (microseconds; 0 after other calls):
  // prepare (the plan, the wait for the staging buffer, the descriptor and input upload's enqueue),
  // launch (the kernels' enqueue), wait (the output copy's enqueue unless mapped, the stream's
  // synchronization and the copy out of the pinned buffer).
  double host_prepare_us = 0, host_launch_us = 0, host_wait_us = 0;
  bool mapped_output = false;  // the last RunStepFromHost's kernels wrote o into host memory
};

// The quantize-append kernels' preferred shared-memory carveout, process-wide (percent of the SM's
// largest, -1 the driver's default): an experiment on how they share SMs with the attention's
// blocks (kvq-bench --qa-carveout). The launches CudaStepRunner::set_qa_wide_carveout picks keep
// the largest.
Result SetQuantizeAppendCarveout(int percent);

class CudaStepRunner {
 public:
  // Creates a runner for the current CUDA device. Fails (never aborts) without a device.
  static Result Create(std::unique_ptr<CudaStepRunner>* out);
  ~CudaStepRunner();
  CudaStepRunner(const CudaStepRunner&) = delete;
  CudaStepRunner& operator=(const CudaStepRunner&) = delete;

  // The whole step: flush + append (one launch for the batch), then attention (split-KV + merge).
  // `arena` is the device base address of the page pool. Asynchronous on `stream`; the staging
  // buffer is reused only after the previous step's copy finished.
  //
  // flush_after (optional): num_seqs flush-only works (n_new = 0; LayerCache::PlanFlushAfter), the
  // pending flushes of the states after this step: launched right after the attention as its
  // programmatic dependent, so they run beside it (the next step then has SeqWork::flush_done).
  // The decode units let it launch once they no longer wait for the step's append (it reads the
  // window tokens the append wrote); it reads only window tokens and writes only body slots past
  // what the attention reads, and waits for the attention only at its end, so the stream's next
  // launch still follows both. Not launched where it flushes nothing, nor after a fused step (its
  // attention fills every SM): stats().flush_after says whether it was; if not, the caller drops
  // those works and the next step flushes as usual. One upload of the descriptors and one error
  // flag serve both (a second runner for the flush cost the store's step ~10 us of host calls).
  Result RunStep(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                 int num_seqs, uint8_t* arena, cudaStream_t stream, const SeqWork* flush_after = nullptr);
  // The step with its inputs and output in host memory (the store's path): params.q, k_new, v_new
  // and o are host pointers of q_bytes, kv_bytes, kv_bytes and q_bytes (rows as the works address
  // them, as for RunStep). The inputs go to the device inside the step's descriptor upload (one
  // host-to-device copy), o comes back together with the kernels' error flag (one device-to-host
  // copy), against five copies when the caller stages q, k, v and o itself. Synchronous: waits for
  // the stream, reports errors as Synchronize does, and o holds the result when it returns Ok (o is
  // not written otherwise; rows of o that no sequence's query rows cover come back unspecified).
  // With set_mapped_output (the default, up to kMappedOutputMaxBytes of o) the kernels write o and
  // the error flag straight into the runner's pinned host buffer instead: no device-to-host copy.
  Result RunStepFromHost(const StepParams& params, int64_t q_bytes, int64_t kv_bytes, const SeqWork* works,
                         const QuantConfig* configs, int num_seqs, uint8_t* arena, cudaStream_t stream,
                         const SeqWork* flush_after = nullptr);
  // The two halves, for tests and the benchmark (same semantics as the CPU reference halves).
  Result QuantizeAppend(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                        int num_seqs, uint8_t* arena, cudaStream_t stream);
  Result Attention(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                   int num_seqs, const uint8_t* arena, cudaStream_t stream);

  // Prepares a batch once (staging + device copy + split plan) so that the benchmark can replay
  // the launches alone: LaunchPrepared* enqueue only kernels.
  Result Prepare(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                 int num_seqs, cudaStream_t stream, const SeqWork* flush_after = nullptr);
  Result LaunchPreparedQuantizeAppend(uint8_t* arena, cudaStream_t stream);
  Result LaunchPreparedAttention(const uint8_t* arena, cudaStream_t stream);
  // The whole prepared step as RunStep launches it: the fused step where the plan chose it
  // (stats().fused), else the two halves above; then the flush after it (stats().flush_after).
  Result LaunchPreparedStep(uint8_t* arena, cudaStream_t stream);
  // The prepared flush-after batch alone, plainly (the benchmark's view of its own time; nothing
  // when it flushes nothing).
  Result LaunchPreparedFlush(uint8_t* arena, cudaStream_t stream);

  // Waits for `stream`, then reports CUDA errors and kernel-detected errors (a quantization
  // scale beyond fp16 range) of the steps launched since the last call.
  Result Synchronize(cudaStream_t stream);

  const CudaStepStats& stats() const { return stats_; }
  // The last Prepare's descriptors as uploaded (sequences, page table, units, merge items, the
  // flush-after batch's sequences and pages, one after the other without the alignment gaps): for
  // tests and tools that check that a change of the planner leaves its plans as they were.
  std::vector<uint8_t> PreparedDescriptors() const;

  // The plan picks the decode fast path for batches it fits (DecodeFastPathFits in
  // step_runner.cc); true forces the generic kernel, so tests and the benchmark can compare both.
  void set_force_generic(bool force) { force_generic_ = force; }
  // Decode path: 2 or 3 ring stages; anything else lets the plan choose (the default).
  void set_ring_stages(int stages) { ring_stages_ = stages; }
  // Decode path: InnerQ and KIVI body tiles and fp16-preset batches on the tensor cores where they fit
  // (default on); off, every tile takes the per-token / per-tile paths (tests and the benchmark
  // compare both).
  void set_imma(bool on) { imma_enabled_ = on; }
  // Decode path, InnerQ-family batches with up to 4 query rows per unit: the whole body pages of K
  // and V go to page units (decode_pages.cuh: bulk copies into a ring of page slots per block; one
  // row on the per-token path's integer products, 2-4 rows on the IMMA units' tensor-core tiles)
  // where they fit (default on); off, the per-token path (one row) or the IMMA units' warp rings
  // take them (tests and the benchmark compare both). Needs set_imma on. Only in batches with at
  // least `min_pages` whole body pages per resident block of the per-token instance: a page unit
  // starts computing when its first whole page has landed, which short units do not win back.
  // Default (-1): 4 for one row, 32 for more (H100: one row 1.06x the per-token path's time at 1.5
  // pages per block, 0.88x at 12; 4 rows 1.18x the IMMA units' at 5, 0.95x at 80); 0: wherever
  // they fit (tests).
  void set_page_units(bool on) { page_units_enabled_ = on; }
  // Page units that do not wait for the quantize-append issue their first page's copies as their
  // block starts, from runs the plan looked up (default on); off, after reading the unit's and the
  // sequence's descriptors and the page table (tests and the benchmark compare both).
  void set_early_pages(bool on) { early_pages_ = on; }
  // Decode path: the per-token units' tiles whose K and V are both in full precision (the sink and
  // the windows around a body) on the tensor cores (MmaTokTiles, in the 4-row InnerQ and KIVI code
  // units' tensor-core instances at head_dim 128; default on), in launches whose body units go first (set_bodies_first:
  // beside the bodies they paid, alone before them they did not); off, on the per-token path's
  // CUDA-core products. Applies from the next Prepare.
  void set_mma_tiles(bool on) { mma_tiles_ = on; }
  static constexpr int kPageMinPagesOneRow = 4, kPageMinPagesRows = 32;
  void set_page_min_pages(int min_pages) { page_min_pages_ = min_pages; }
  // KIVI body units on the tensor cores need this many tokens per unit at 2 blocks per SM (a batch
  // size heuristic; -1: the default, 0: whenever they fit, for tests).
  void set_kivi_mma_min_unit_tokens(int tokens) { kivi_min_unit_tokens_ = tokens; }
  // KIVI body units multiply the packed codes on the tensor cores (decode_kivi_codes.cuh: 1 to 8
  // rows, fp16 and bf16, asym K and V; the default) or dequantize each tile to fp16 in shared
  // memory (decode_mma_kivi.cuh: 2 to 8 rows, fp16; off). Measured on an H200 (2026-12-05): the
  // code units 1.5-1.7x faster at the GQA shapes; tests and the benchmark compare both. They take
  // every KIVI tile they fit, one-row 4-bit included (1.01-1.09x the per-token path there since
  // the rings are aligned, H100).
  void set_kivi_codes(bool on) { kivi_codes_mode_ = on ? 1 : 0; }
  // The attention launch as a programmatic dependent of the quantize-append (Hopper): its blocks
  // are launched while the quantize-append finishes and wait for it on the device. set_pdl forces
  // it on or off; by default (set_pdl_auto) the plan decides per step: on, except where the
  // quantize-append's grid covers more than one block per SM and the attention's units fill less
  // than 1.5 waves of resident blocks (unless the body units go first, set_bodies_first). There the
  // H200 measured PDL 5-30 us slower per step ((16,32,32,4096), (16,32,8,32768); docs/gpu_notes.md),
  // elsewhere 1-3 us faster. Either call applies from the next Prepare.
  void set_pdl(bool on) { pdl_mode_ = on ? 1 : 0; }
  void set_pdl_auto() { pdl_mode_ = -1; }
  // The fused step (decode path): RunStep / LaunchPreparedStep run the quantize-append inside the
  // attention launch. Per (sequence, KV head), the first unit that reads what it writes runs it
  // and the head's other such units wait for it on the device; the rest never wait. One launch per
  // step instead of two. Only on steps whose quantize-append is small (the append and a one-token
  // along_channels flush: most steps); a step that flushes along_tokens groups or computes the
  // key-norm factors launches it on its own (stats().fused false). By default the plan fuses only
  // few items of long KIVI or fp16 sequences, where it measured faster (step_runner.cc);
  // set_fused_step forces it on or off (tests, the benchmark). Applies from the next Prepare.
  void set_fused_step(bool on) { fused_mode_ = on ? 1 : 0; }
  // The quantize-append's own launches (not the fused step's) may flush along_tokens groups of 32
  // (InnerQ's values, KIVI's keys: every 32 or 128 steps) one group per lane, 32 groups per warp,
  // instead of one per warp: D / 32 warps per 32-token block instead of D, each lane running the
  // reference quantizer on its group (same codes). -1 (the default): where one group per warp
  // would take more than kQaLaneWaves waves of the device's resident quantize-append warps (512
  // KV heads of 32-token value flushes on an H100; fewer measured slower); 0 never; 1 wherever
  // such groups are flushed (tests). Applies from the next Prepare.
  void set_qa_lanes(int mode) { qa_lanes_mode_ = mode; }
  // The quantize-append's own launches give K and V each the blocks per (sequence, KV head) its
  // flush needs (K's every-step flush: 2 blocks at D = 128; V's 32-token flush: 64, or 2 with
  // lanes); set_qa_split_chunks(false) gives both the larger count (A/Bs, tests). Applies from the
  // next Prepare.
  void set_qa_split_chunks(bool on) { qa_split_chunks_ = on; }
  // The quantize-append's own launches on the steps that append one token or none and flush nothing
  // or one token of along_channels groups of 32 (every decode step of the presets but the 32- or
  // 128-token along_tokens flush and the first key-norm step): one block of four warps per
  // (sequence, KV head) for K and V together, with the page-table lookups done on the host
  // (DevQaHead), instead of the per-tensor grid (at D = 128, 2 blocks for K's 4 groups and one for
  // V's append). On an H100 (2026-12-07, bench/results/raw/2026-12-07b/call2) qa_step 9.4 -> 7.1 us
  // at (16,32,32,4096) innerq, 11.6 -> 8.1 at (64,32,8,8192), 14.6 -> 11.2 kivi2 there, 3.3 -> 3.0
  // at (1,32,32,32768). -1 (the default) and 1 on, 0 never (the grid: A/Bs, tests). Applies from
  // the next Prepare.
  void set_qa_head(int mode) { qa_head_mode_ = mode; }
  // The step's own quantize-append launch as kernels that prefer the SM's largest shared-memory
  // carveout: an SM they start on (they launch first, on idle SMs) then keeps room for the
  // attention's blocks beside them. -1 (the default): where the InnerQ page units' bodies go
  // first (set_bodies_first), which measured faster on an H100 (2026-12-07,
  // bench/results/raw/2026-12-07c/call1: qa_step at (16,32,32,4096) innerq 6.8 -> 5.7 us, innerq2
  // 9.0 -> 4.4, at (16,32,8,32768) innerq2 4.1 -> 3.1, innerq unchanged); elsewhere it was slower
  // or no faster ((64,32,8,8192) innerq 8.0 -> 10.7, kivi2 11.3 -> 13.0 with its bodies first too;
  // (1,32,32,4096) innerq 1.6 -> 2.0). 1 always, 0 never. Applies from the next Prepare.
  void set_qa_wide_carveout(int mode) { qa_wide_mode_ = mode; }
  // The number of blocks the split-KV plan fills (0: the device's resident blocks, the default).
  // A small number makes few long units, as on a device with few SMs or under a large batch
  // (tests of the kernels' precision over long units).
  void set_split_blocks(int blocks) { split_blocks_ = blocks; }
  // Decode path, one-wave launches: no SM holds more than ceil(units / SMs) of the launch's blocks
  // (unused dynamic shared memory keeps the rest out), so that blocks launched while the
  // quantize-append retires (PDL) cannot pile up on the SMs it frees first. Off by default (an
  // experiment: docs/gpu_notes.md, "PDL costs the batched shapes").
  void set_spread_blocks(bool on) { spread_blocks_ = on; }
  // Decode path, launches with per-token units around tensor-core or page bodies: the order of the
  // units in the grid (blocks start in grid order). 0: the per-token units first (short, so that
  // body units beyond one wave start as soon as they finish); 1: the body units first, so that the
  // per-token units, which mostly wait for the quantize-append (they cover the new tokens), take
  // the resident blocks the bodies leave; -1 (the default): the plan decides (bodies first where
  // the launch has more units than resident blocks, the bodies fit in one wave and there are at
  // most 8 per-token units per block they leave free, 32 beside KIVI code units; PDL is then on
  // too).
  void set_bodies_first(int mode) { bodies_first_mode_ = mode < 0 ? -1 : (mode > 0 ? 1 : 0); }
  // RunStepFromHost: the kernels write o and the error flag into the runner's pinned host buffer
  // (mapped into the device's address space) where o is at most kMappedOutputMaxBytes, instead of
  // into device memory followed by a device-to-host copy (on by default; off for A/Bs and tests).
  static constexpr int64_t kMappedOutputMaxBytes = int64_t{256} << 10;
  void set_mapped_output(bool on) { mapped_output_ = on; }
  // Decode path: the kernel instance for at least this many query rows per unit (1, 4 or 8; 1 the
  // default: the instance the batch's rows need). An experiment on the one-row shapes: the 4-row
  // instance runs one-row units with empty rows (other unit kinds, other issue timing).
  void set_min_row_class(int rows) { min_row_class_ = rows; }
  // Decode path: the warps' rings start this many bytes (a multiple of 16, below 128) past the
  // 128-byte aligned dynamic shared memory (0, the default). An experiment: the one-row instance's
  // rings started 48 bytes past a 128-byte line before the alignment was declared.
  void set_ring_offset(int bytes) { ring_offset_ = bytes >= 0 && bytes < 128 ? bytes / 16 * 16 : 0; }
  // The benchmark's view into the quantize-append: the launches from now on write per-warp phase
  // stamps (clock cycles and global nanoseconds, cuda::kQaTraceSlots per warp, step_desc.h) to
  // this device buffer, which must hold qa_trace_warps() x kQaTraceSlots int64 for every prepared
  // step it is used with; null (the default) turns it off. The slots: cuda::kQaTraceSlots.
  static constexpr int kQaTraceSlots = 10;
  void set_qa_trace(int64_t* device_stamps) { qa_trace_ = device_stamps; }
  // Warps of the prepared step's quantize-append grid (0 before a Prepare).
  int64_t qa_trace_warps() const;
  // The benchmark's view into the decode units: the attention launches from now on write
  // kUnitTraceSlots phase stamps per unit (global timer, ns; cuda::kUnitTraceSlots, step_desc.h)
  // to this device buffer, which must hold stats().num_units x kUnitTraceSlots int64; null (the
  // default) turns it off. Only kernels built with KVQ_UNIT_TRACE (cmake -DKVQ_UNIT_TRACE=ON,
  // unit_trace_built()) write them; the others have no trace code.
  static constexpr int kUnitTraceSlots = 16;
  void set_unit_trace(int64_t* device_stamps) { unit_trace_ = device_stamps; }
  static bool unit_trace_built();

 private:
  CudaStepRunner() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Result LaunchAttentionImpl(const uint8_t* arena, const cuda::QaArgs* fused_qa, cudaStream_t stream);
  Result LaunchFlush(uint8_t* arena, bool dependent, cudaStream_t stream);
  // The host inputs of RunStepFromHost, copied into the descriptor upload (null: none).
  struct HostInputs {
    const void* q;
    const void* k;
    const void* v;
    int64_t q_bytes, kv_bytes;
  };
  Result ClearErrorFlag(int32_t flag, cudaStream_t stream);  // resets it; the flag's error
  Result PrepareImpl(const StepParams& params, const SeqWork* works, const QuantConfig* configs, int num_seqs,
                     cudaStream_t stream, const SeqWork* flush_after, const HostInputs* in);
  CudaStepStats stats_;
  bool force_generic_ = false;
  int ring_stages_ = 0;
  bool imma_enabled_ = true;
  bool page_units_enabled_ = true;
  bool early_pages_ = true;
  bool mma_tiles_ = true;
  int page_min_pages_ = -1;
  int kivi_min_unit_tokens_ = -1;
  int kivi_codes_mode_ = -1;  // -1 the default (the code units), 0 off, 1 on
  int pdl_mode_ = -1;  // -1 the plan decides, 0 off, 1 on
  int fused_mode_ = -1;  // -1 the plan decides, 0 off, 1 on
  int split_blocks_ = 0;
  bool spread_blocks_ = false;
  int bodies_first_mode_ = -1;
  int64_t* unit_trace_ = nullptr;
  bool mapped_output_ = true;
  int min_row_class_ = 1;
  int ring_offset_ = 0;
  int64_t* qa_trace_ = nullptr;
  int qa_lanes_mode_ = -1;  // -1 the plan decides, 0 off, 1 on
  int qa_head_mode_ = -1;   // -1 (on) or 1 on, 0 off
  int qa_wide_mode_ = -1;   // -1 the plan decides, 0 off, 1 on
  bool qa_split_chunks_ = true;
};

}  // namespace kvq
