// The quantize-append kernels' bodies (quantize_append.cu wraps them in __global__ functions):
// one block of QuantizeAppendKernel (the flush of its share of the groups, one warp per group,
// then the append) and of KeyNormKernel. Host-compilable like warp_quant.cuh, with the block's
// indices and shared memory passed in and its barrier behind warp::BlockSync, so
// tests/kernels_gpu/quantize_append_emu_test.cc runs this very code on the CPU, block by block on
// emulated threads, against CpuQuantizeAppend.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <chrono>
#endif

#include <vector_types.h>

#include "kvq/format.h"
#include "kvq/numeric.h"
#include "step_desc.h"
#include "lane_quant.cuh"
#include "warp_quant.cuh"

namespace kvq {
namespace cuda {

// The trace's clocks (QaArgs::trace): the SM's cycle counter, the global nanosecond timer and the
// SM id on the device; on the host (emulated blocks) a steady clock for both and SM 0.
#if defined(__CUDA_ARCH__)
KVQ_WARP int64_t QaClock() { return clock64(); }
KVQ_WARP int64_t QaGlobalTimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<int64_t>(t);
}
KVQ_WARP int64_t QaSmId() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
#else
inline int64_t QaClock() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline int64_t QaGlobalTimer() { return QaClock(); }
inline int64_t QaSmId() { return 0; }
#endif

// The lines of [p, p + bytes) into L1 (device; nothing on the host): the block's step descriptors,
// requested at its start so that the fields read one after another further on hit L1 instead of
// each waiting for DRAM in turn (no registers held, unlike loading them all at the start: 80 -> 116
// registers, H100 2026-12-05 eighth session).
KVQ_WARP void QaPrefetchL1(const void* p, int bytes, int tid) {
#if defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p);
  const int lines = static_cast<int>(((reinterpret_cast<uintptr_t>(c) & 127) + bytes + 127) >> 7);
  if (tid < lines) asm volatile("prefetch.global.L1 [%0];" ::"l"(c + tid * 128 - (reinterpret_cast<uintptr_t>(c) & 127)));
#else
  (void)p;
  (void)bytes;
  (void)tid;
#endif
}

// Channel c of token `slot`, head h of a full-precision page, as float.
KVQ_WARP float LoadActDev(const uint8_t* arena, int64_t page, int slot, int h, int c, int d, DType dtype) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(arena + page + FullTokenOffset(slot, h, d) + c * 2);
  return LoadAct(p, dtype);
}

// The trace's stamp [3] once the warp's window values v have arrived: the vote waits for them, the
// clock is read after the branch on it.
template <int N>
KVQ_WARP void StampValuesArrived(const float (&v)[N], int lane, int64_t* tr) {
  bool arrived = true;
  KVQ_UNROLL
  for (int j = 0; j < N; ++j) arrived = arrived && v[j] == v[j];
  if (warp::Ballot(arrived) != 0u && lane == 0) tr[3] = QaClock();
}

// The warp's group of values v quantized and stored as group `group` of the body page's head data
// at `head` (format fields as in DevTensor); error flag 2 instead where the reference fails
// (non-finite input, a scale or zero beyond fp16 range). tr: trace slots [4], [5] (or null).
// kSumsBy4: WarpQuantizeGroup's.
template <int J, bool kSumsBy4 = false>
KVQ_WARP void QuantizeStoreGroup(const float (&v)[J], int bits, int mode, int words_per_group, int scales_offset,
                                 int has_zeros, int zeros_offset, uint8_t* head, int group, int32_t* error_flag,
                                 float* err, int lane, int64_t* tr) {
  uint32_t code[J];
  uint16_t scale_bits = 0, zero_bits = 0;
  const bool quantized =
      WarpQuantizeGroup<J, kSumsBy4>(v, bits, static_cast<QuantMode>(mode), err, lane, code, &scale_bits, &zero_bits);
  if (tr && lane == 0) tr[4] = QaClock();
  if (!quantized) {
    if (lane == 0) warp::SetFlag(error_flag, 2);  // non-finite input, or a scale or zero beyond fp16 range
    return;
  }
  WarpPackStore<J>(code, bits, lane, reinterpret_cast<uint32_t*>(head) + group * words_per_group);
  if (lane == 0) {
    reinterpret_cast<uint16_t*>(head + scales_offset)[group] = scale_bits;
    if (has_zeros) reinterpret_cast<uint16_t*>(head + zeros_offset)[group] = zero_bits;
    if (tr) tr[5] = QaClock();
  }
}

// Flush group gi of tensor x of head h, quantized by the calling warp (knorm: the head's key-norm
// factors in the arena, read beside the window values). tr: the warp's trace slots for its first
// group (QaArgs::trace), else null.
template <int J>
KVQ_WARP void FlushGroup(const QaArgs& a, const DevTensor& x, int h, int gi, bool norm, const float* knorm,
                         float* err, int lane, int64_t* tr) {
  constexpr int G = 32 * J;
  const int D = a.head_dim;
  const DType dtype = static_cast<DType>(a.dtype);
  const bool along_channels = x.grouping == static_cast<int>(Grouping::kAlongChannels);
  float v[J];
  int body_tok, group;
  if (along_channels) {
    const int t = gi / (D / G);
    const int c0 = (gi % (D / G)) * G;
    const int w = x.win_first + t;
    const int64_t page = a.pages[x.win_pages + w / kPageTokens];
    KVQ_UNROLL
    for (int j = 0; j < J; ++j) {
      const int c = c0 + j * 32 + lane;
      const float raw = LoadActDev(a.arena, page, w % kPageTokens, h, c, D, dtype);
      v[j] = norm ? DivRn(raw, knorm[c]) : raw;
    }
    body_tok = x.body_len + t;
    group = (body_tok % kPageTokens) * (D / G) + c0 / G;
  } else {
    const int tb = gi / D;
    const int c = gi % D;
    KVQ_UNROLL
    for (int j = 0; j < J; ++j) {
      const int w = x.win_first + tb * G + j * 32 + lane;
      const float raw = LoadActDev(a.arena, a.pages[x.win_pages + w / kPageTokens], w % kPageTokens, h, c, D, dtype);
      v[j] = norm ? DivRn(raw, knorm[c]) : raw;
    }
    body_tok = x.body_len + tb * G;
    group = ((body_tok % kPageTokens) / G) * D + c;
  }
  // the destination page's entry loads while the warp quantizes
  const int64_t body_page = a.pages[x.body_pages + body_tok / kPageTokens];
  if (tr) StampValuesArrived(v, lane, tr);
  // (QuantizeStoreGroup's steps, written out: the decode objects' fused step keeps its registers)
  uint32_t code[J];
  uint16_t scale_bits = 0, zero_bits = 0;
  const bool quantized =
      WarpQuantizeGroup<J>(v, x.bits, static_cast<QuantMode>(x.mode), err, lane, code, &scale_bits, &zero_bits);
  if (tr && lane == 0) tr[4] = QaClock();
  if (!quantized) {
    if (lane == 0) warp::SetFlag(a.error_flag, 2);  // non-finite input, or a scale or zero beyond fp16 range
    return;
  }
  uint8_t* head = a.arena + body_page + static_cast<int64_t>(h) * x.head_bytes;
  WarpPackStore<J>(code, x.bits, lane, reinterpret_cast<uint32_t*>(head) + group * x.words_per_group);
  if (lane == 0) {
    reinterpret_cast<uint16_t*>(head + x.scales_offset)[group] = scale_bits;
    if (x.has_zeros) reinterpret_cast<uint16_t*>(head + x.zeros_offset)[group] = zero_bits;
    if (tr) tr[5] = QaClock();
  }
}

// Flush of along_tokens groups of 32 tokens, one group per lane: lane l of the warp quantizes group
// gi0 + l (tokens tb * 32 .. + 31 of channel c, where gi = tb * D + c), so a warp takes 32
// adjacent channels of one 32-token block. Each lane loads its 32 values (the warp reads 64
// contiguous bytes per token) and quantizes them alone (LaneQuantizeGroup32, lane_quant.cuh: the
// codes, scales and zeros of the reference's QuantizeGroupRef and PackCodes, kvq/quant.h, in a
// fraction of its instructions), with no warp reductions, shared memory or per-group chain of
// dependent loads. The warp stores its 32 groups' words, scales and zeros as contiguous runs
// (group index = c within the 32-token block). One launch then needs D / 32 warps per block of 32
// tokens instead of D (QaPlan with lanes): at (16,32,32,4096) innerq the value flush of every 32nd
// step is 2 blocks per head, not 64.
// tr: the warp's trace slots (QaArgs::trace) when this is its first task, else null.
template <int kBits>
KVQ_WARP void LaneQuantizeStore(const float* xs, QuantMode mode, uint8_t* head, const DevTensor& x, int group,
                                int32_t* error_flag, int lane, int64_t* tr) {
  uint16_t scale_bits = 0, zero_bits = 0;
  uint32_t* dst = reinterpret_cast<uint32_t*>(head) + group * kBits;  // G * bits / 32 words a group
  const bool quantized = LaneQuantizeGroup32<kBits>(xs, 32, mode, dst, &scale_bits, &zero_bits);
  if (tr && lane == 0) tr[4] = QaClock();
  if (!quantized) {
    warp::SetFlag(error_flag, 2);  // non-finite input, or a scale or zero beyond fp16 range
    return;
  }
  reinterpret_cast<uint16_t*>(head + x.scales_offset)[group] = scale_bits;
  if (x.has_zeros) reinterpret_cast<uint16_t*>(head + x.zeros_offset)[group] = zero_bits;
}

// A window value's bits as float: the conversion instruction on the device (exact for finite
// values, inf and NaN for inf and NaN: the quantizer only tells those apart from finite ones),
// the reference's conversion on the host.
KVQ_WARP float LaneActToFloat(uint16_t bits, bool bf16) {
  if (bf16) return Bf16BitsToFloat(bits);
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
  return f;
#else
  return HalfBitsToFloat(bits);
#endif
}

KVQ_WARP void FlushLaneGroups(const QaArgs& a, const DevTensor& x, int h, int gi0, bool norm, const float* knorm,
                              float* xs, int lane, int64_t* tr) {
  constexpr int G = 32;
  const int D = a.head_dim;
  const bool bf16 = static_cast<DType>(a.dtype) == DType::kBF16;
  const int gi = gi0 + lane;  // D is a multiple of 32: every lane has a group
  const int tb = gi / D;
  const int c = gi % D;
  const int w0 = x.win_first + tb * G;
  // the group's tokens lie on at most two window pages: in_first on the first, from slot s0
  const int s0 = w0 % kPageTokens;
  const int in_first = kPageTokens - s0;
  const int64_t* win_pages = a.pages + x.win_pages + w0 / kPageTokens;
  const uint16_t* p0 = reinterpret_cast<const uint16_t*>(a.arena + win_pages[0] + FullTokenOffset(s0, h, D)) + c;
  const uint16_t* p1 =
      in_first < G ? reinterpret_cast<const uint16_t*>(a.arena + win_pages[1] + FullTokenOffset(0, h, D)) + c : p0;
  uint16_t raw[G];
  KVQ_UNROLL
  for (int t = 0; t < G; ++t) raw[t] = t < in_first ? p0[t * D] : p1[(t - in_first) * D];
  const int body_tok = x.body_len + tb * G;
  const int group = ((body_tok % kPageTokens) / G) * D + c;
  // the destination page's entry loads while the lane quantizes
  const int64_t body_page = a.pages[x.body_pages + body_tok / kPageTokens];
  float v[G];
  KVQ_UNROLL
  for (int t = 0; t < G; ++t) v[t] = LaneActToFloat(raw[t], bf16);
  if (tr) StampValuesArrived(v, lane, tr);
  // the lane's column of the warp's shared memory (value t at xs[t * 32 + lane]): the quantizer's
  // passes are loops over it (lane_quant.cuh)
  float* col = xs + lane;
  KVQ_UNROLL
  for (int t = 0; t < G; ++t) col[t * 32] = v[t];
  if (norm) {
    const float f = knorm[c];
    KVQ_NO_UNROLL
    for (int t = 0; t < G; ++t) col[t * 32] = DivRn(col[t * 32], f);
  }
  uint8_t* head = a.arena + body_page + static_cast<int64_t>(h) * x.head_bytes;
  const QuantMode mode = static_cast<QuantMode>(x.mode);
  switch (x.bits) {
    case 2: LaneQuantizeStore<2>(col, mode, head, x, group, a.error_flag, lane, tr); break;
    case 3: LaneQuantizeStore<3>(col, mode, head, x, group, a.error_flag, lane, tr); break;
    case 4: LaneQuantizeStore<4>(col, mode, head, x, group, a.error_flag, lane, tr); break;
    default: warp::SetFlag(a.error_flag, 2); break;  // not reached: CudaSupports admits 2, 3 and 4 bits
  }
  if (tr && lane == 0) tr[5] = QaClock();
}

constexpr int kQaWarps = kQaThreads / 32;
// The floats of shared memory a warp of QuantizeAppendBlock needs: one group's two error rows
// (FlushGroup), or with lanes 32 values for each of its 32 lanes (FlushLaneGroups).
constexpr int QaWarpFloats(bool lanes) { return lanes ? 32 * 32 : 2 * kMaxGroupSize; }

// Key-norm factors from the first flushed keys (max |k| per channel), for the sequences that
// quantize keys for the first time this step; block (sequence, KV head), thread = channel
// (KeyNormKernel).
KVQ_WARP void KeyNormBlock(const QaArgs& a, int seq, int h, int tid, int nthreads) {
  const DevSeq& s = a.seqs[seq];
  const DevTensor& x = s.k;
  if (!s.compute_norm || !s.key_norm || x.flush <= 0 || x.mode == static_cast<int>(QuantMode::kFull)) return;
  const int D = a.head_dim;
  const DType dtype = static_cast<DType>(a.dtype);
  float* f = reinterpret_cast<float*>(a.arena + s.norm_offset) + h * D;
  for (int c = tid; c < D; c += nthreads) {
    float mx = 0.f;
    for (int t = 0; t < x.flush; ++t) {
      const int w = x.win_first + t;
      mx = MaxF(mx, AbsF(LoadActDev(a.arena, a.pages[x.win_pages + w / kPageTokens], w % kPageTokens, h, c, D, dtype)));
    }
    f[c] = KeyNormFactor(mx);
  }
}

// One block of a tensor's share of a head's quantize-append: z even K, odd V, chunk z / 2 of that
// tensor's num_chunks (QuantizeAppendGridBlock maps QuantizeAppendKernel's grid onto this; the
// fused step runs z = 0 .. 2 * chunks - 1 with one count for both), thread tid of kQaThreads; err:
// the calling warp's QaWarpFloats(kLanes) floats of shared memory; trace_block: the block's place in
// QaArgs::trace (kTrace only). No block barrier: the fused step runs two of these blocks in one
// attention block. Its
// global loads are mostly cold and each step's chain of them sets its time, so the
// independent ones go out together: the append's first row with the flush's window values and
// key-norm factors (read by each lane from the arena), the destination page entry before the
// quantization; the append's store waits until after the flush.
// kTrace: the instance that writes QaArgs::trace's stamps (the benchmark's); the other one has no
// trace code at all (the stamps' pointer and clocks cost it 13 registers).
// kLanes: along_tokens flushes of G = 32 go one group per lane (FlushLaneGroups), 32 groups per
// warp task (QaPlan with lanes). Off (the fused step's instance): one group per warp everywhere.
template <bool kTrace = false, bool kLanes = false>
KVQ_WARP void QuantizeAppendBlock(const QaArgs& a, int seq, int h, int z, int num_chunks, int tid, float* err,
                                  int64_t trace_block = 0) {
  const DevSeq& s = a.seqs[seq];
  QaPrefetchL1(&s, sizeof(DevSeq), tid);
  const bool is_k = (z & 1) == 0;
  const int chunk = z >> 1;
  const DevTensor& x = is_k ? s.k : s.v;
  const int D = a.head_dim;
  const int hkv = a.num_kv_heads;
  const int warp = tid >> 5, lane = tid & 31;
  int64_t* tr = kTrace && a.trace ? a.trace + (trace_block * kQaWarps + warp) * kQaTraceSlots : nullptr;
  if (tr && lane == 0) {
    tr[0] = QaGlobalTimer();
    tr[1] = QaClock();
    tr[8] = QaSmId();
  }

  // Append: 16-byte copies of the new rows of this head (chunk 0), the first one per thread loaded
  // before the flush.
  const uint16_t* src = is_k ? a.k_new : a.v_new;
  const int row_chunks = D / 8;
  const int appends = chunk == 0 ? s.n_new * row_chunks : 0;
  auto append_at = [&](int idx, uint4* v) -> uint8_t* {
    const int j = idx / row_chunks;
    const int c0 = (idx % row_chunks) * 8;
    int64_t page;
    int slot;
    if (j < s.to_sink) {
      page = x.sink_page;
      slot = s.sink_len + j;
    } else {
      const int w = x.win_first + x.win_len + (j - s.to_sink);
      page = a.pages[x.win_pages + w / kPageTokens];
      slot = w % kPageTokens;
    }
    *v = *reinterpret_cast<const uint4*>(src + ((s.kv_row + j) * hkv + h) * D + c0);
    return a.arena + page + FullTokenOffset(slot, h, D) + c0 * 2;
  };
  uint4 first{};
  uint8_t* first_dst = tid < appends ? append_at(tid, &first) : nullptr;

  int groups = 0;
  if (x.flush > 0 && x.mode != static_cast<int>(QuantMode::kFull)) {
    if (tr && lane == 0) tr[2] = QaClock();
    const int G = x.group_size;
    const bool along_channels = x.grouping == static_cast<int>(Grouping::kAlongChannels);
    const int num_groups = along_channels ? x.flush * (D / G) : (x.flush / G) * D;
    if (chunk * kQaWarps < num_groups) {  // block-uniform
      const bool norm = is_k && s.key_norm;
      // factors of this step's KeyNormKernel, or of an earlier step
      const float* knorm = norm ? reinterpret_cast<const float*>(a.arena + s.norm_offset) + h * D : nullptr;
      if (kLanes && LaneFlush(x)) {
        for (int t = chunk * kQaWarps + warp; t * 32 < num_groups; t += num_chunks * kQaWarps, ++groups)
          FlushLaneGroups(a, x, h, t * 32, norm, knorm, err, lane, groups == 0 ? tr : nullptr);
      } else {
        for (int gi = chunk * kQaWarps + warp; gi < num_groups; gi += num_chunks * kQaWarps, ++groups) {
          int64_t* gtr = groups == 0 ? tr : nullptr;
          if (G == 32) {
            FlushGroup<1>(a, x, h, gi, norm, knorm, err, lane, gtr);
          } else if (G == 64) {
            FlushGroup<2>(a, x, h, gi, norm, knorm, err, lane, gtr);
          } else {
            FlushGroup<4>(a, x, h, gi, norm, knorm, err, lane, gtr);
          }
        }
      }
    }
  } else if (tr && lane == 0) {
    tr[2] = QaClock();
  }
  if (first_dst) *reinterpret_cast<uint4*>(first_dst) = first;
  for (int idx = tid + kQaThreads; idx < appends; idx += kQaThreads) {
    uint4 v;
    uint8_t* dst = append_at(idx, &v);
    *reinterpret_cast<uint4*>(dst) = v;
  }
  if (tr && lane == 0) {
    tr[6] = QaClock();
    tr[7] = QaGlobalTimer();
    tr[9] = groups;
  }
}

// Block (seq, h, zi) of QuantizeAppendKernel's grid of grid_z blocks per (sequence, KV head): the
// first a.k_chunks are K's chunks, the rest V's (QaPlan::k_chunks / v_chunks).
template <bool kTrace, bool kLanes>
KVQ_WARP void QuantizeAppendGridBlock(const QaArgs& a, int seq, int h, int zi, int grid_z, int tid, float* err) {
  const bool is_v = zi >= a.k_chunks;
  const int chunk = is_v ? zi - a.k_chunks : zi;
  QuantizeAppendBlock<kTrace, kLanes>(a, seq, h, 2 * chunk + (is_v ? 1 : 0), is_v ? grid_z - a.k_chunks : a.k_chunks,
                                      tid, err, (static_cast<int64_t>(seq) * a.num_kv_heads + h) * grid_z + zi);
}

// One block of QuantizeAppendHeadKernel: the whole quantize-append of sequence seq's KV head h in a
// step that QaHeadFits (QaPlan::head), kQaHeadWarps warps. The flush groups of K, then of V, are
// the block's tasks, task i on warp i % kQaHeadWarps; each warp loads all of its tasks' window values (and
// key-norm factors) before it quantizes the first, so its loads go out together. The append's new
// rows of K and V (one 16-byte piece per thread) load beside them and are stored after the flush,
// as QuantizeAppendBlock does. Every address comes from the host (DevQaHead), so the chain is the
// descriptor, the values, the quantizer, the stores; the codes are FlushGroup<1>'s (the same
// quantizer and stores, the same values and key-norm division). err: the calling warp's
// 2 * kMaxGroupSize floats of shared memory; trace_block: seq * Hkv + h (kTrace only). kSumsBy4:
// WarpQuantizeGroup's, for the steps that flush hybrid groups (QaPlan::hybrid).
template <bool kTrace, bool kSumsBy4 = false>
KVQ_WARP void QuantizeAppendHeadBlock(const QaArgs& a, const DevQaHead* heads, int seq, int h, int tid, float* err,
                                      int64_t trace_block) {
  constexpr int kWarps = kQaHeadWarps;
  const DevQaHead* hd = heads + 2 * seq;
  QaPrefetchL1(hd, 2 * sizeof(DevQaHead), tid);
  const int D = a.head_dim;
  const int hkv = a.num_kv_heads;
  const int warp = tid >> 5, lane = tid & 31;
  const DType dtype = static_cast<DType>(a.dtype);
  const int64_t row_stride = int64_t{kPageTokens} * D * 2;  // one head's rows in a full-precision page
  int64_t* tr = kTrace && a.trace ? a.trace + (trace_block * kWarps + warp) * kQaTraceSlots : nullptr;
  if (tr && lane == 0) {
    tr[0] = QaGlobalTimer();
    tr[1] = QaClock();
    tr[8] = QaSmId();
  }

  // Append: thread i < D / 8 copies 16 bytes of K's new row, the next D / 8 threads V's (the plan
  // asks for 2 * D / 8 <= kWarps * 32).
  const int row_chunks = D / 8;
  uint4 row{};
  uint8_t* row_dst = nullptr;
  if (tid < 2 * row_chunks) {
    const int ti = tid < row_chunks ? 0 : 1;
    const int c0 = (tid - ti * row_chunks) * 8;
    const DevQaHead& x = hd[ti];
    if (x.append_row >= 0) {
      row = *reinterpret_cast<const uint4*>((ti ? a.v_new : a.k_new) + (int64_t{x.append_row} * hkv + h) * D + c0);
      row_dst = a.arena + x.append_dst + h * row_stride + c0 * 2;
    }
  }

  // Flush: the warp's tasks' values (channel c of the flushed token, divided by its key-norm factor).
  const int nk = hd[0].groups;
  const int tasks = nk + hd[1].groups;
  if (tr && lane == 0) tr[2] = QaClock();
  float v[kQaHeadGroupsPerWarp][1];
  KVQ_UNROLL
  for (int j = 0; j < kQaHeadGroupsPerWarp; ++j) {
    const int t = warp + j * kWarps;
    if (t < tasks) {
      const DevQaHead& x = hd[t < nk ? 0 : 1];
      const int c = (t < nk ? t : t - nk) * 32 + lane;
      const float raw = LoadAct(reinterpret_cast<const uint16_t*>(a.arena + x.flush_src + h * row_stride) + c, dtype);
      v[j][0] = x.norm >= 0 ? DivRn(raw, reinterpret_cast<const float*>(a.arena + x.norm)[h * D + c]) : raw;
    }
  }
  int groups = 0;
  KVQ_UNROLL
  for (int j = 0; j < kQaHeadGroupsPerWarp; ++j) {
    const int t = warp + j * kWarps;
    if (t < tasks) {  // warp-uniform
      const DevQaHead& x = hd[t < nk ? 0 : 1];
      int64_t* gtr = j == 0 ? tr : nullptr;
      if (gtr) StampValuesArrived(v[j], lane, gtr);
      QuantizeStoreGroup<1, kSumsBy4>(v[j], x.bits, x.mode, x.words_per_group, x.scales_offset, x.has_zeros, x.zeros_offset,
                            a.arena + x.flush_dst + static_cast<int64_t>(h) * x.head_bytes,
                            x.group0 + (t < nk ? t : t - nk), a.error_flag, err, lane, gtr);
      ++groups;
    }
  }
  if (row_dst) *reinterpret_cast<uint4*>(row_dst) = row;
  if (tr && lane == 0) {
    tr[6] = QaClock();
    tr[7] = QaGlobalTimer();
    tr[9] = groups;
  }
}

}  // namespace cuda
}  // namespace kvq
