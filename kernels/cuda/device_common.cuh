// Device helpers shared by the kernels: activation conversions, token location in the paged
// layout, and the fused dequantization of 8 consecutive channels of one token.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "kvq/format.h"
#include "kvq/quant.h"
#include "step_desc.h"

namespace kvq {
namespace cuda {

// Host side: answers of the occupancy API remembered per (device, key). The plan asks for the
// resident blocks of up to six ring depths every step; each answer costs a cudaDeviceGetAttribute
// and a cudaOccupancyMaxActiveBlocksPerMultiprocessor call, and does not change while the process
// runs (it depends on the kernel, the device and the dynamic shared memory only). Runners on
// several streams plan at once: the table is read and written under a lock. Only answers the API
// gave are kept (a failed call is asked again next time); the table holds at most kMaxEntries.
class OccupancyMemo {
 public:
  static constexpr size_t kMaxEntries = 256;
  bool Find(int device, int key, int* value) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Entry& e : entries_)
      if (e.device == device && e.key == key) {
        *value = e.value;
        return true;
      }
    return false;
  }
  void Put(int device, int key, int value) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Entry& e : entries_)
      if (e.device == device && e.key == key) return;
    if (entries_.size() < kMaxEntries) entries_.push_back({device, key, value});
  }

 private:
  struct Entry {
    int device, key, value;
  };
  std::mutex mu_;
  std::vector<Entry> entries_;
};

// Resident blocks per SM of a kernel launched without dynamic shared memory, asked of the
// occupancy API once per device (memo: the caller's, one per kernel, key 0); 1 when the API fails.
template <typename Kernel>
int BlocksPerSmNoSmem(OccupancyMemo* memo, Kernel kernel, int threads) {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  if (memo->Find(dev, 0, &n)) return n;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  n = n > 0 ? n : 1;
  memo->Put(dev, 0, n);
  return n;
}

template <DType DT>
__device__ __forceinline__ float ActToFloat(uint16_t bits) {
  if constexpr (DT == DType::kF16) {
    return __half2float(__ushort_as_half(bits));
  } else {
    return __uint_as_float(uint32_t{bits} << 16);
  }
}

template <DType DT>
__device__ __forceinline__ uint16_t FloatToAct(float f) {
  if constexpr (DT == DType::kF16) {
    return __half_as_ushort(__float2half_rn(f));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
}

// 2^x by the MUFU alone (ex2.approx.ftz: what exp2f computes, less its handling of results below
// 2^-126, which the online softmaxes of the decode units can treat as 0: such a p or rescale factor
// is below 2^-126 of the running maximum's term); KVQ_CUDA_EMU host builds: exp2f, flushed alike.
__device__ __forceinline__ float Exp2Ftz(float x) {
#if defined(KVQ_CUDA_EMU)
  const float r = exp2f(x);
  return r < 1.17549435e-38f ? 0.f : r;
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// Unpacks 8 activation values from a 16-byte vector.
template <DType DT>
__device__ __forceinline__ void Unpack8(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = ActToFloat<DT>(static_cast<uint16_t>(w[i] & 0xffffu));
    out[2 * i + 1] = ActToFloat<DT>(static_cast<uint16_t>(w[i] >> 16));
  }
}

// Where token t (0 .. length-1, after the step) of a stream lives.
struct TokLoc {
  int64_t page;  // arena offset
  int32_t slot;
  int32_t body;  // 1: quantized body page, 0: full-precision page (sink or window)
};

__device__ __forceinline__ TokLoc Locate(const DevSeq& s, const DevTensor& x, const int64_t* pages,
                                         int t) {
  TokLoc l;
  const int sink_post = s.sink_len + s.to_sink;
  if (t < sink_post) {
    l.page = x.sink_page;
    l.slot = t;
    l.body = 0;
    return l;
  }
  const int u = t - sink_post;
  const int body_post = x.body_len + x.flush;
  if (u < body_post) {
    l.page = pages[x.body_pages + u / kPageTokens];
    l.slot = u % kPageTokens;
    l.body = 1;
    return l;
  }
  const int w = x.win_first + x.flush + (u - body_post);
  l.page = pages[x.win_pages + w / kPageTokens];
  l.slot = w % kPageTokens;
  l.body = 0;
  return l;
}

__device__ __forceinline__ uint32_t ExtractBits(const uint32_t* words, int bitoff, int bits) {
  const int w = bitoff >> 5;
  const int sh = bitoff & 31;
  uint32_t v = __ldg(words + w) >> sh;
  if (sh + bits > 32) v |= __ldg(words + w + 1) << (32 - sh);
  return v & ((1u << bits) - 1u);
}

// A group's dequantization as value = code * a + b (one multiply-add per element), from its
// stored fp16 scale s and zero z: asymmetric (or hybrid with negative s): a = |s|, b = z;
// symmetric (or hybrid with positive s): a = s, b = -L * s with L = 2^(bits-1) - 1.
__device__ __forceinline__ float2 GroupAffine(int bits, int mode, float s, float z) {
  if (mode == static_cast<int>(QuantMode::kAsym) ||
      (mode == static_cast<int>(QuantMode::kHybrid) && s < 0.f)) {
    return make_float2(fabsf(s), z);
  }
  return make_float2(s, -static_cast<float>(SymLevels(bits)) * s);
}

// A tensor's mode as a template argument (the presets' fast paths): kModeAny reads it at run time.
constexpr int kModeAny = -1;
constexpr int kModeSym = static_cast<int>(QuantMode::kSym);
constexpr int kModeHybrid = static_cast<int>(QuantMode::kHybrid);

// GroupAffine with the mode known at compile time where MODE says so: no compare of the mode, and
// for hybrid one select by the scale's sign.
template <int MODE>
__device__ __forceinline__ float2 GroupAffineM(int bits, int mode, float s, float z) {
  if constexpr (MODE == kModeSym) {
    return make_float2(s, -static_cast<float>(SymLevels(bits)) * s);
  } else if constexpr (MODE == kModeHybrid) {
    return make_float2(fabsf(s), s < 0.f ? z : -static_cast<float>(SymLevels(bits)) * s);
  } else {
    return GroupAffine(bits, mode, s, z);
  }
}

// Small unsigned integer (< 2^23) to float without the quarter-rate I2F: 2^23 + c is exact in
// fp32 when its bits are 0x4B000000 | c; subtracting 2^23 leaves c exactly.
__device__ __forceinline__ float CodeToFloat(uint32_t c) {
  return __uint_as_float(0x4B000000u | c) - 8388608.f;
}

__device__ __forceinline__ float HalfBits(const uint8_t* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// Dequantizes channels c0 .. c0+7 of the body token at `slot` of KV head `h`.
template <int D>
__device__ __forceinline__ void DequantBody8(const uint8_t* arena, const DevTensor& x, int64_t page,
                                             int h, int slot, int c0, float* out) {
  const uint8_t* head = arena + page + static_cast<int64_t>(h) * x.head_bytes;
  const uint32_t* codes = reinterpret_cast<const uint32_t*>(head);
  const int G = x.group_size;
  const int bits = x.bits;
  if (x.grouping == static_cast<int>(Grouping::kAlongChannels)) {
    const int g = slot * (D / G) + c0 / G;
    const int i0 = c0 % G;
    const float s = HalfBits(head + x.scales_offset + 2 * g);
    const float z = x.has_zeros ? HalfBits(head + x.zeros_offset + 2 * g) : 0.f;
    const float2 ab = GroupAffine(bits, x.mode, s, z);
    const uint32_t* words = codes + g * x.words_per_group;
    // 8 codes of <= 4 bits: at most 32 bits starting at bit i0*bits, possibly over two words.
    const int bitoff = i0 * bits;
    const int w = bitoff >> 5;
    const int sh = bitoff & 31;
    uint64_t v = __ldg(words + w);
    if (sh + 8 * bits > 32) v |= static_cast<uint64_t>(__ldg(words + w + 1)) << 32;
    v >>= sh;
    const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      out[e] = static_cast<float>(static_cast<uint32_t>(v >> (e * bits)) & mask) * ab.x + ab.y;
    }
  } else {
    const int gbase = (slot / G) * D;
    const int i = slot % G;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int g = gbase + c0 + e;
      const float s = HalfBits(head + x.scales_offset + 2 * g);
      const float z = x.has_zeros ? HalfBits(head + x.zeros_offset + 2 * g) : 0.f;
      const float2 ab = GroupAffine(bits, x.mode, s, z);
      const uint32_t code = ExtractBits(codes + g * x.words_per_group, i * bits, bits);
      out[e] = static_cast<float>(code) * ab.x + ab.y;
    }
  }
}

// Programmatic dependent launch (sm_90). The attention kernels wait here for the preceding kernel
// in the stream (the quantize-append) to complete and its writes to be visible, before their first
// read of anything it writes; without the launch attribute this returns at once. What was written
// before the quantize-append started (the step's descriptors, q, the key-norm factors, the older
// tokens) is complete by the time a dependent runs: a dependent launches only once every block of
// its primary has started, and the primary started after all earlier work in the stream. The
// generic attention kernel waits at its start; a decode unit only when its tiles meet the step's
// writes (UnitWaitsForQuantizeAppend). The quantize-append kernel lets its dependent launch right away
// (the dependent only launches once every one of its blocks has started, so none is starved).
__device__ __forceinline__ void GridDependencyWait() {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::GridDependencyWait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void GridDependentsLaunch() {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::GridDependentsLaunch();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// The same from a later point, after the block's own GridDependencyWait (the decode units, for the
// next step's flush): the dependent launches once every block has called it, so it sees what each
// block wrote before its call (the emulated device takes its image at the last block's call).
__device__ __forceinline__ void GridDependentsLaunchAfterWait() {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::GridDependentsLaunch(true);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launches a kernel of one by-value argument, as a programmatic dependent of the preceding kernel
// in the stream when pdl. Host builds with KVQ_CUDA_EMU (tests/emu/cuda_emu.h) run the grid on
// emulated threads instead.
template <typename Args>
cudaError_t LaunchKernel(void (*kernel)(Args), dim3 grid, dim3 block, int smem, cudaStream_t stream,
                         const Args& args, bool pdl) {
#if defined(KVQ_CUDA_EMU)
  return kvq_emu::RunGrid(grid, block, static_cast<size_t>(smem), stream, [&] { kernel(args); }, pdl);
#else
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, args);
  if (e != cudaSuccess && cfg.numAttrs > 0) {
    // A platform that refuses the attribute still gets the plain launch (a launch error that is
    // not about the attribute comes back again from the plain launch).
    (void)cudaGetLastError();
    cfg.numAttrs = 0;
    e = cudaLaunchKernelEx(&cfg, kernel, args);
  }
  return e;
#endif
}

// Launches an attention kernel (argument AttnArgs), as a programmatic dependent when args.pdl.
template <typename Kernel>
cudaError_t LaunchAttnKernel(Kernel kernel, int grid, int block, int smem, cudaStream_t stream, const AttnArgs& args) {
  return LaunchKernel(kernel, dim3(grid), dim3(block), smem, stream, args, args.pdl != 0);
}

// Copies a unit's sequence descriptor into shared memory, word by word over the block's threads
// (its fields are read in every tile; shared reloads cost less than global ones after barriers).
// The caller synchronizes before reading `dst`.
template <int kThreads>
__device__ __forceinline__ void LoadSeqToShared(const DevSeq* src, DevSeq* dst) {
  static_assert(sizeof(DevSeq) % 4 == 0, "DevSeq copied as words");
  for (int i = threadIdx.x; i < static_cast<int>(sizeof(DevSeq) / 4); i += kThreads)
    reinterpret_cast<uint32_t*>(dst)[i] = reinterpret_cast<const uint32_t*>(src)[i];
}

// Query element c of a unit's row r as float: row = i * group + j reads query token i of the
// sequence, query head kv_head * group + j; rows past the unit's num_rows read as 0.
template <int D, DType DT>
__device__ __forceinline__ float UnitQuery(const uint16_t* q, int num_q_heads, int group, const DevSeq& s,
                                           const DevUnit& unit, int r, int c) {
  if (r >= unit.num_rows) return 0.f;
  const int row = unit.row0 + r;
  const int i = row / group;
  const int hq = unit.kv_head * group + row % group;
  return ActToFloat<DT>(q[((s.q_row + i) * num_q_heads + hq) * D + c]);
}

// The merged row r of an item: channels c .. c + 3 of its sum of weighted partial rows (acc) over
// the sum of weights l, into the output row of the query token and head it belongs to.
template <int D, DType DT>
__device__ __forceinline__ void StoreMergedRow(const DevMergeItem& it, const DevSeq& s, uint16_t* o, int num_q_heads,
                                               int group, int r, int c, float4 acc, float l) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  const int row = it.row0 + r;
  const int i = row / group;
  const int hq = it.kv_head * group + row % group;
  uint16_t* out = o + ((s.q_row + i) * num_q_heads + hq) * D + c;
  out[0] = FloatToAct<DT>(acc.x * inv);
  out[1] = FloatToAct<DT>(acc.y * inv);
  out[2] = FloatToAct<DT>(acc.z * inv);
  out[3] = FloatToAct<DT>(acc.w * inv);
}

// Combines the units' unnormalized (o, m, l) of one merge item into the final output rows, with
// the threads of a block: one warp per row. The lanes first read the units' (m, l) pairs 32 at a
// time (the row's maximum, then each unit's weight 2^(m_u - m)); then a unit's partial row is one
// 16-byte load per lane (D / 4 lanes per unit, so two units per step at D = 64) and eight units'
// loads are in flight together, each weighted by its unit's weight taken from the lane that read
// it. The merge runs after the last unit of an item, on one SM while the others may be idle, so
// its latency chain is what counts: a loop over elements with a loop over units inside (every
// element re-reading every unit's m and l) took ~15 us for 64 units (ncu, (1,9,3,8192)).
// A unit whose tokens are all masked for a row has m = -inf and l = 0 and gets weight 0; a row
// always sees at least itself, so the combined l is > 0. L2 loads (__ldcg): the partials may have
// been written by other blocks of the same launch (fused merge).
template <int D, DType DT>
__device__ __forceinline__ void MergeItemRows(const DevMergeItem& it, const DevSeq& s, const float* part_o,
                                              const float* part_ml, uint16_t* o, int num_q_heads, int group,
                                              int tid, int threads) {
  static_assert(D % 4 == 0 && D <= 128, "a unit's row is at most one float4 per lane");
  constexpr int kLanesPerUnit = D / 4;
  constexpr int kUnitsPerStep = 32 / kLanesPerUnit;
  const int lane = tid & 31;
  const int sub = lane / kLanesPerUnit;  // which unit of a step this lane reads
  const int c = (lane % kLanesPerUnit) * 4;
  const int n = it.num_units;
  for (int r = tid >> 5; r < it.num_rows; r += threads >> 5) {
    const float2* ml = reinterpret_cast<const float2*>(part_ml) + static_cast<int64_t>(it.unit0) * kRowsPerUnit + r;
    float m = -INFINITY;
    for (int u = lane; u < n; u += 32) m = fmaxf(m, __ldcg(ml + static_cast<int64_t>(u) * kRowsPerUnit).x);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (m != -INFINITY) {  // warp-uniform
      for (int u0 = 0; u0 < n; u0 += 32) {
        const int cnt = min(32, n - u0);
        float w = 0.f;  // unit u0 + lane's weight; 0 past the item's units
        if (lane < cnt) {
          const float2 x = __ldcg(ml + static_cast<int64_t>(u0 + lane) * kRowsPerUnit);
          w = x.x == -INFINITY ? 0.f : exp2f(x.x - m);
          l += w * x.y;
        }
        const float* po = part_o + (static_cast<int64_t>(it.unit0 + u0) * kRowsPerUnit + r) * D + c;
#pragma unroll 8
        for (int j = 0; j < cnt; j += kUnitsPerStep) {
          // (j + sub <= 31; past cnt the weight is 0 and the load repeats the last unit)
          const float wj = __shfl_sync(0xffffffffu, w, j + sub);
          const int ju = min(j + sub, cnt - 1);
          const float4 v = __ldcg(reinterpret_cast<const float4*>(po + static_cast<int64_t>(ju) * kRowsPerUnit * D));
          acc.x += wj * v.x;
          acc.y += wj * v.y;
          acc.z += wj * v.z;
          acc.w += wj * v.w;
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
#pragma unroll
    for (int off = kLanesPerUnit; off < 32; off <<= 1) {
      acc.x += __shfl_xor_sync(0xffffffffu, acc.x, off);
      acc.y += __shfl_xor_sync(0xffffffffu, acc.y, off);
      acc.z += __shfl_xor_sync(0xffffffffu, acc.z, off);
      acc.w += __shfl_xor_sync(0xffffffffu, acc.w, off);
    }
    if (sub == 0) {
      StoreMergedRow<D, DT>(it, s, o, num_q_heads, group, r, c, acc, l);
    }
  }
}

}  // namespace cuda
}  // namespace kvq
