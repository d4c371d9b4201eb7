// Decode fast path of the split-KV attention: few query rows per unit (R <= kRowsPerUnit), every
// quantized tensor grouped by G = 32 and the sink a multiple of 32 tokens (the plan checks this;
// the generic kernel in attention.cuh serves everything else).
//
// One block = one DevUnit; its 4 warps take 32-token tiles in turn and keep their own online
// softmax state in registers, so the tile loop has no block barrier; the warps meet once at the end.
// Per tile, scores with lane = token, P.V with lane = D/32 consecutive channels. The packed codes
// go straight from 16-byte loads into registers and the products are computed on the codes:
//  - along_channels K body (InnerQ): s_g * sum_i q'_i c_i + b_g * sum_i q'_i per 32-channel group
//    (q' = q * key-norm factor, its group sums precomputed once per unit);
//  - along_tokens K body (KIVI): the warp stages the tile's code words (1 group of 32 tokens per
//    channel) in its own shared memory, with q'_c * a_c per channel and the zero term
//    sum_c q'_c b_c computed once per tile; lane = token then sums q'_c a_c * c_{t,c};
//  - along_tokens V body (InnerQ): per channel a_c * sum_t p_t c_{t,c} + b_c * sum_t p_t;
//  - along_channels V body (KIVI): lane = token loads its token's code words (16-byte loads) and
//    its groups' (a, b), stages them in the warp's shared memory, then per token p_t * (a_g c + b_g);
//  - full-precision tokens (sink, window) and along_channels body tokens of a tile that crosses
//    the body's end: token by token, kVBatch tokens' loads in flight.
// A group's value is a*c + b with (a, b) from GroupAffine (sym / asym / hybrid by the scale's sign).
// With one query row, InnerQ keys and values and KIVI 2/4-bit values run as dp4a integer products
// on the codes (code_bytes.cuh: codes as bytes, q' / p a as 16-bit fixed point); InnerQ batches with
// 2-4 rows send whole body tiles to tensor-core units (decode_imma.cuh). The item's last unit
// merges the partials (DecodeEpilogue), so the decode path needs no merge launch.
// The kernel is instantiated per (D, dtype) file for R in {1, 4, 8} and per path family (fp16,
// InnerQ, KIVI, all): code paths a batch never takes would cost registers and resident warps.
#pragma once

#include <atomic>
#include <cfloat>
#include <mutex>
#include <type_traits>

#include "code_bytes.cuh"
#include "device_common.cuh"
#include "quantize_append.cuh"

namespace kvq {
namespace cuda {

constexpr int kDecWarps = kDecRingWarps;
constexpr int kDecThreads = kDecWarps * 32;
constexpr int kVBatch = 8;

// A load from global memory (read-only path) or from shared memory (a staged tile).
template <bool SM, typename T>
__device__ __forceinline__ T Ld(const T* p) {
  if constexpr (SM) {
    return *p;
  } else {
    return __ldg(p);
  }
}

// cp.async and its groups; KVQ_CUDA_EMU host builds: tests/emu/cuda_emu.h's deferred copies.
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::CpAsync(smem, gmem, 16);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#endif
}
// CpAsync16(smem + SOFF, gmem + GOFF) with both offsets in the instruction: written out as
// immediates, so that the compiler cannot hoist the per-lane offset plus each copy's own out of
// a loop into registers and add it per copy as a 64-bit sum (what it did with pointer + constant).
template <int SOFF, int GOFF>
__device__ __forceinline__ void CpAsync16At(void* smem, const void* gmem) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::CpAsync(static_cast<uint8_t*>(smem) + SOFF, static_cast<const uint8_t*>(gmem) + GOFF, 16);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%3], 16;\n" ::"r"(dst), "l"(gmem), "n"(SOFF), "n"(GOFF)
               : "memory");
#endif
}
// N copies CpAsync16At<i SSTEP, i GSTEP>, i < N.
template <int N, int SSTEP, int GSTEP, int I = 0>
__device__ __forceinline__ void CpAsync16Run(void* smem, const void* gmem) {
  if constexpr (I < N) {
    CpAsync16At<I * SSTEP, I * GSTEP>(smem, gmem);
    CpAsync16Run<N, SSTEP, GSTEP, I + 1>(smem, gmem);
  }
}
__device__ __forceinline__ void CpAsyncCommit() {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::CpAsyncCommit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::CpAsyncWait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// InnerQ page units (decode_pages.cuh): whole body pages of one KV head copied by the
// Hopper bulk-copy engine (cp.async.bulk, one instruction per contiguous run, no lane addresses)
// into the block's ring slots, each slot with an mbarrier that counts the bytes in (complete_tx).
// KVQ_CUDA_EMU host builds: tests/emu/cuda_emu.h's copies, which land only when a wait completes
// the slot's phase.
__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::MbarInit(bar, count);
#else
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(b), "r"(count) : "memory");
#endif
}
// The barriers' initialization visible to the bulk-copy engine (before any copy signals them).
__device__ __forceinline__ void MbarInitFence() {
#if !defined(KVQ_CUDA_EMU)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// The calling thread's arrival on the barrier's current phase, which then also waits for `bytes`
// bytes of bulk copies.
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::MbarArriveExpectTx(bar, bytes);
#else
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(bytes) : "memory");
#endif
}
// Until the barrier's phase of this parity has completed. Every lane of the warp calls it (the
// emulator's lanes then leave the wait loop together, as its warp operations need).
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
#if defined(KVQ_CUDA_EMU)
  while (!__all_sync(0xffffffffu, kvq_emu::MbarTryWait(bar, parity) ? 1 : 0)) {
  }
#else
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(b), "r"(parity)
        : "memory");
  } while (!done);
#endif
}
// bytes (a multiple of 16; both addresses 16-byte aligned) from global to shared memory, counted
// on bar when they have landed.
__device__ __forceinline__ void BulkCopy(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
#if defined(KVQ_CUDA_EMU)
  kvq_emu::BulkCopy(smem, gmem, bytes, bar);
#else
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(d),
               "l"(gmem), "r"(bytes), "r"(b)
               : "memory");
#endif
}
// atomicAdd on shared memory with acq_rel semantics at block scope: no separate fence
// (__threadfence_block is a sequentially consistent MEMBAR.SC.CTA; this compiles to MEMBAR.ALL.CTA
// before the ATOMS, still inside the compiler's warp aggregation of the atomic).
__device__ __forceinline__ int AtomicAddAcqRelCta(int* p, int v) {
#if defined(KVQ_CUDA_EMU)
  return atomicAdd(p, v);
#else
  int old;
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], %2;\n" : "=r"(old) : "r"(a), "r"(v) : "memory");
  return old;
#endif
}
// The thread's earlier generic-proxy accesses ordered before its later bulk copies: shared memory
// (a slot read by the warp before a copy refills it) or global memory (pages written by the
// quantize-append of a fused step, read by bulk copies after the wait for it).
__device__ __forceinline__ void FenceProxyAsyncShared() {
#if !defined(KVQ_CUDA_EMU)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void FenceProxyAsyncGlobal() {
#if !defined(KVQ_CUDA_EMU)
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
#endif
}

// cp.async.wait_group with the ring depth known only at run time (2 to kMaxRingStages stages).
constexpr int kMaxRingStages = 6;
__device__ __forceinline__ void CpAsyncWaitRing(int stages) {
  switch (stages) {
    case 2: CpAsyncWait<1>(); break;
    case 3: CpAsyncWait<2>(); break;
    case 4: CpAsyncWait<3>(); break;
    case 5: CpAsyncWait<4>(); break;
    default: CpAsyncWait<5>(); break;
  }
}

// A warp's walk over its tiles through its cp.async ring (every tensor-core unit): the tiles
// first_tile, first_tile + 4 * 32, ... below tok_end; issue(tile0, slot) stages one tile and commits
// one group (also past the end, so the group count stays fixed); the ring runs stages - 1 tiles
// ahead; tile(tile0, slot) computes on a staged tile. The slot is free again after tile() returns.
template <typename Issue, typename Tile>
__device__ __forceinline__ void WarpRingTiles(int first_tile, int tok_end, int stages, Issue&& issue, Tile&& tile) {
  constexpr int kStep = kDecRingWarps * 32;
  for (int i = 0; i + 1 < stages; ++i) issue(first_tile + i * kStep, i);
  int slot = 0;  // it % stages for the it-th tile, kept without a division
  for (int tile0 = first_tile; tile0 < tok_end; tile0 += kStep) {
    issue(tile0 + (stages - 1) * kStep, slot == 0 ? stages - 1 : slot - 1);  // (it + stages - 1) % stages
    CpAsyncWaitRing(stages);
    __syncwarp();
    tile(tile0, slot);
    __syncwarp();  // the slot (and any per-tile scratch) is consumed before the next issue reuses it
    slot = slot + 1 == stages ? 0 : slot + 1;
  }
  CpAsyncWait<0>();
  __syncwarp();
}

// Code paths a kernel instance contains (the plan picks the smallest family that covers the batch;
// paths a batch never takes cost registers, hence resident warps, if compiled in).
enum DecodePath : int { kPathKCh = 1, kPathKTok = 2, kPathVTok = 4, kPathVCh = 8 };
constexpr int kFamFull = 0;                        // fp16 preset: full-precision tokens only
constexpr int kFamInnerQ = kPathKCh | kPathVTok;   // InnerQ presets
constexpr int kFamKivi = kPathKTok | kPathVCh;     // KIVI presets
constexpr int kFamAll = kPathKCh | kPathKTok | kPathVTok | kPathVCh;
// Instance marker (not a family of DecodeFamily): the KIVI family whose tensor-core body units
// multiply the packed codes (decode_kivi_codes.cuh); its per-token path is the KIVI family's.
constexpr int kFamKiviCodes = kFamKivi | 32;
static_assert(kPathKCh == kDecodePathKCh && kPathKTok == kDecodePathKTok && kPathVTok == kDecodePathVTok &&
                  kPathVCh == kDecodePathVCh,
              "step_desc.h and decode.cuh agree on the path bits");
__host__ __device__ constexpr int DecodeFamily(int path_bits) {
  const int paths = path_bits & ~kDecodeUnitBits;
  return paths == 0 ? kFamFull
         : (paths & ~kFamInnerQ) == 0 ? kFamInnerQ
         : (paths & ~kFamKivi) == 0   ? kFamKivi
                                      : kFamAll;
}  // tokens whose value loads are in flight together on the per-token path

// Sizes of what lives in a warp's union area (DecSmem::Warp::u) beside the tiles: the fused step's
// flush error sums (FusedQuantizeAppend), and the IMMA units' tile state (decode_imma.cuh: p bytes
// [8 columns][32 slots], then (a, b) per key (token, group) and per value channel).
constexpr int kFusedErrBytes = 2 * kMaxGroupSize * static_cast<int>(sizeof(float));
__host__ __device__ constexpr int ImmaTileStateBytes(int d) {
  return 256 + (32 * (d / 32) + d) * static_cast<int>(sizeof(float2));
}

// The block's static shared memory. The InnerQ instances (no along_tokens keys, no along_channels
// values) leave out those tiles' work areas: 8.2 KB less per block at one row and D = 128, so that
// the page units' ring (decode_pages.cuh) leaves room for more blocks, or a quantize-append block
// beside them. Their union keeps room for the fused step's error sums and, at 2-4 rows, the IMMA
// tile state (decode_imma.cuh); and it holds the per-token path's tile state too (p per row and
// token, the V tokens' locations), which no other user of the union needs while that path's loop
// runs (the fused step's sums come before it, the accumulators after it, and the tensor-core units
// never run it): 4 KB less per block at 4 rows and D = 128 (room for a quantize-append block
// beside four page blocks; a third page-ring stage would fit too, but it measured slower, so the
// plan keeps two: step_runner.cc). The KIVI and fp16 instances keep that state beside
// the union, where their tiles' work areas live while it is in use. Access goes through P(),
// VPage(), VSlot() and VBody(), the same code for both layouts.
template <int D, int R, int PATHS>
struct DecSmem {
  static constexpr int kNG = D / 32;
  static constexpr bool kKiviTiles = PATHS != kFamInnerQ;
  struct KTokTile {
    // along_tokens K tile: word i of channel c's group at codes[i][c], so the words of 4
    // consecutive channels are one 16-byte read; rows padded by 4 words so the lanes reading
    // different rows hit different banks
    uint32_t codes[4][D + 4];
    float qa[R][D];  // q'_c * a_c
  };
  struct VChTile {
    uint32_t codes[32][D / 32 * 4];  // along_channels V tile: token t's code words
    float2 ab[32][D / 32];           // and its groups' (a, b) (written after the scores)
  };
  struct NoTile {};
  struct TokState {  // the per-token path's tile: p per row and token, the V tokens' locations
    float p[R][32];
    int64_t vpage[32];
    int vslot[32];
    int vbody[32];
  };
  static constexpr int kRawBytes = R > 1 && ImmaTileStateBytes(D) > kFusedErrBytes ? ImmaTileStateBytes(D) : kFusedErrBytes;
  union Area {
    std::conditional_t<kKiviTiles, KTokTile, NoTile> k;
    std::conditional_t<kKiviTiles, VChTile, NoTile> v;
    float o[R][D];  // end of the unit: this warp's accumulator
    uint8_t raw[kRawBytes];
    std::conditional_t<kKiviTiles, NoTile, TokState> tok;
  };
  struct alignas(16) WarpApart {  // float4 reads of p and qa
    Area u;
    float p[R][32];
    alignas(16) uint8_t pb[2][32];  // R = 1, along_tokens V body tile: p as (high, low) bytes in slot order
    int64_t vpage[32];
    int vslot[32];
    int vbody[32];
    __device__ __forceinline__ float (&P())[R][32] { return p; }
    __device__ __forceinline__ const float (&P() const)[R][32] { return p; }
    __device__ __forceinline__ int64_t (&VPage())[32] { return vpage; }
    __device__ __forceinline__ const int64_t (&VPage() const)[32] { return vpage; }
    __device__ __forceinline__ int (&VSlot())[32] { return vslot; }
    __device__ __forceinline__ const int (&VSlot() const)[32] { return vslot; }
    __device__ __forceinline__ int (&VBody())[32] { return vbody; }
    __device__ __forceinline__ const int (&VBody() const)[32] { return vbody; }
  };
  struct alignas(16) WarpInUnion {
    Area u;
    alignas(16) uint8_t pb[2][32];  // R = 1, along_tokens V body tile: p as (high, low) bytes in slot order
    __device__ __forceinline__ float (&P())[R][32] { return u.tok.p; }
    __device__ __forceinline__ const float (&P() const)[R][32] { return u.tok.p; }
    __device__ __forceinline__ int64_t (&VPage())[32] { return u.tok.vpage; }
    __device__ __forceinline__ const int64_t (&VPage() const)[32] { return u.tok.vpage; }
    __device__ __forceinline__ int (&VSlot())[32] { return u.tok.vslot; }
    __device__ __forceinline__ const int (&VSlot() const)[32] { return u.tok.vslot; }
    __device__ __forceinline__ int (&VBody())[32] { return u.tok.vbody; }
    __device__ __forceinline__ const int (&VBody() const)[32] { return u.tok.vbody; }
  };
  using Warp = std::conditional_t<kKiviTiles, WarpApart, WarpInUnion>;
  Warp w[kDecWarps];
  alignas(16) float q[R][D];
  alignas(16) float qn[R][D];
  float qsum[R][kNG];
  alignas(16) uint8_t qbh[kNG][32];  // R = 1, along_channels K: q' as (high, low) bytes in slot order
  alignas(16) uint8_t qbl[kNG][32];
  float qinv;                        // max |q'| / kFixedScale: the fixed-point unit of qbh / qbl
  int pos[R];
  float m[kDecWarps][R];
  float l[kDecWarps][R];
  float wt[kDecWarps][R];  // epilogue: each warp's weight per row
  int merge_last;
  int qa_owner;            // the fused step: this unit runs its head's quantize-append (FusedStepOwnOrWait)
};

// Codes as floats in [1, 2) without an add per code: the code's bits rotated to the top of the fp32
// mantissa (bits [23 - BITS, 23)) and OR-ed with the exponent of 1.0 give exactly
// u = 1 + c * 2^-BITS (one funnel shift and one LOP3 per code, no FADD). The products use u and
// remove the constant once per group / tile: sum_i x_i c_i = 2^BITS * (sum_i x_i u_i - sum_i x_i),
// and a c + b = (2^BITS a) u + (b - 2^BITS a). The sums stay fp32; the cancellation costs at most
// 2^BITS ulps of sum |x_i| (<= 16 * 2^-24 relative), far below the fp16 inputs' rounding.
template <int BITS>
__device__ __forceinline__ constexpr uint32_t UnitTopMask() { return ((1u << BITS) - 1u) << (23 - BITS); }
template <int BITS>
__device__ __forceinline__ constexpr float UnitScale() { return static_cast<float>(1u << BITS); }

// u = 1 + c * 2^-BITS for the code at bit `sh` of lo (continuing into hi when it crosses the word;
// pass hi = lo otherwise: the funnel shift is then a rotation).
template <int BITS>
__device__ __forceinline__ float UnitCode(uint32_t lo, uint32_t hi, int sh) {
  const uint32_t x = __funnelshift_r(lo, hi, (sh - (23 - BITS)) & 31);
  return __uint_as_float((x & UnitTopMask<BITS>()) | 0x3F800000u);
}

// Code i (compile-time) of a packed little-endian bitstream held in registers, as u = 1 + c * 2^-BITS.
template <int BITS>
__device__ __forceinline__ float UnitAt(const uint32_t* w, int i) {
  const int bit = i * BITS;
  const int sh = bit & 31;
  const uint32_t lo = w[bit >> 5];
  // a code that crosses into the next word: sh >= 30 > 23 - BITS, so the shift is a right shift
  const uint32_t hi = sh + BITS > 32 ? w[(bit >> 5) + 1] : lo;
  return UnitCode<BITS>(lo, hi, sh);
}

template <int N, bool SM = false>
__device__ __forceinline__ void LoadWords(const uint32_t* src, uint32_t* dst) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 v = Ld<SM>(reinterpret_cast<const uint4*>(src) + i);
      dst[4 * i] = v.x;
      dst[4 * i + 1] = v.y;
      dst[4 * i + 2] = v.z;
      dst[4 * i + 3] = v.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const uint2 v = Ld<SM>(reinterpret_cast<const uint2*>(src) + i);
      dst[2 * i] = v.x;
      dst[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = Ld<SM>(src + i);
  }
}

// N consecutive fp16 values (N = 2 or 4, 2N-byte aligned) as floats.
template <int N, bool SM = false>
__device__ __forceinline__ void LoadHalves(const uint8_t* p, float* out) {
  static_assert(N == 2 || N == 4, "2 or 4 halves");
  uint32_t w[N / 2];
  if constexpr (N == 4) {
    const uint2 v = Ld<SM>(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  } else {
    w[0] = Ld<SM>(reinterpret_cast<const uint32_t*>(p));
  }
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// Where body codes, scales and zeros start: a group's entries in a head's page (global memory) or
// in a staged copy of a tile (shared memory, same relative layout); callers add the token or
// channel index.
struct BodySrc {
  const uint8_t* codes;
  const uint8_t* scales;
  const uint8_t* zeros;  // unused without zeros
};

// N consecutive fp16 scales (and zeros: 0 without them) of a body group run starting at group idx.
// MODE (kModeAny: x's at run time): symmetric tensors store no zeros, hybrid ones always do.
template <int N, bool SM, int MODE = kModeAny>
__device__ __forceinline__ void LoadScaleZero(const BodySrc& b, const DevTensor& x, int idx, float* s, float* z) {
  LoadHalves<N, SM>(b.scales + 2 * idx, s);
  if (MODE == kModeHybrid || (MODE == kModeAny && x.has_zeros)) {
    LoadHalves<N, SM>(b.zeros + 2 * idx, z);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) z[j] = 0.f;
  }
}

// Full-precision key row of one token (lane): sc[r] += q[r] . k.
template <int D, DType DT, int R, typename Smem>
__device__ __forceinline__ void KFullToken(const Smem& sm, const uint8_t* row, float* sc) {
#pragma unroll
  for (int half = 0; half < D / 64; ++half) {
    uint4 raw[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) raw[i] = __ldg(reinterpret_cast<const uint4*>(row) + half * 8 + i);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float k[8];
      Unpack8<DT>(raw[i], k);
      const int c = half * 64 + i * 8;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 q0 = *reinterpret_cast<const float4*>(&sm.q[r][c]);
        const float4 q1 = *reinterpret_cast<const float4*>(&sm.q[r][c + 4]);
        sc[r] += k[0] * q0.x + k[1] * q0.y + k[2] * q0.z + k[3] * q0.w + k[4] * q1.x + k[5] * q1.y +
                 k[6] * q1.z + k[7] * q1.w;
      }
    }
  }
}

// Full-precision key rows of a warp tile by lane quads (where kKeyQuads: 4 and 8 rows at head_dim
// 128, not in the KIVI code units' instances): lane 4i + t reads the 16-byte
// chunks t, t + 4, ... of token 8g + i's row, g = 0..3, so that one load instruction covers 8 rows x
// 64 contiguous bytes (8 cache lines; 32 when each lane reads its own token's row, KFullToken), and
// sums its share of q[r] . k for its four tokens; a quad's four shares meet by a reduce-scatter
// (3 shuffles per row) and one more shuffle hands lane L token L's score. off: this lane's token's
// row (arena offset), or -1 (a body token, or past the unit's end: nothing is added to its score).
// Why: the around units' tiles at (64,32,8,8192) spent ~19,500 SM cycles per warp tile on the key
// scores with KFullToken's loads (H100 unit trace); the quads made the 4-row InnerQ launches
// 0.8-4.2% faster, but the key phase stays ~15,000 cycles, so the lines per load were not what it
// waits on (docs/gpu_notes.md, twenty-seventh session). Called by the whole warp.
template <int D, DType DT, int R, typename Smem>
__device__ __forceinline__ void KFullTileQuads(const Smem& sm, const uint8_t* arena, int64_t off, int lane,
                                               float* sc) {
  constexpr int NJ = D / 32;  // chunks per lane and token: the row's D / 8 over the quad's 4 lanes
  const int t = lane & 3;
  int64_t offs[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) offs[g] = __shfl_sync(0xffffffffu, off, 8 * g + (lane >> 2));
  float part[4][R];
#pragma unroll
  for (int g = 0; g < 4; ++g)
#pragma unroll
    for (int r = 0; r < R; ++r) part[g][r] = 0.f;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    const int chunk = t + 4 * j;
    uint4 raw[4];
#pragma unroll
    for (int g = 0; g < 4; ++g)
      raw[g] = offs[g] >= 0 ? __ldg(reinterpret_cast<const uint4*>(arena + offs[g]) + chunk) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 q0 = *reinterpret_cast<const float4*>(&sm.q[r][chunk * 8]);
      const float4 q1 = *reinterpret_cast<const float4*>(&sm.q[r][chunk * 8 + 4]);
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        float k[8];
        Unpack8<DT>(raw[g], k);
        part[g][r] += k[0] * q0.x + k[1] * q0.y + k[2] * q0.z + k[3] * q0.w + k[4] * q1.x + k[5] * q1.y +
                      k[6] * q1.z + k[7] * q1.w;
      }
    }
  }
  const bool b0 = (t & 1) != 0;
  const bool b1 = (t & 2) != 0;
  const int src = 4 * (lane & 7) + (lane >> 3);  // the lane whose quad share ends as token `lane`
#pragma unroll
  for (int r = 0; r < R; ++r) {
    // lanes t and t ^ 1: each keeps groups t & 1 and 2 + (t & 1) and takes its partner's share of them
    const float k0 = (b0 ? part[1][r] : part[0][r]) + __shfl_xor_sync(0xffffffffu, b0 ? part[0][r] : part[1][r], 1);
    const float k1 = (b0 ? part[3][r] : part[2][r]) + __shfl_xor_sync(0xffffffffu, b0 ? part[2][r] : part[3][r], 1);
    // lanes t and t ^ 2: lane t ends with group t, token 8t + (lane >> 2)
    const float fin = (b1 ? k1 : k0) + __shfl_xor_sync(0xffffffffu, b1 ? k0 : k1, 2);
    sc[r] += __shfl_sync(0xffffffffu, fin, src);
  }
}

// along_channels (G = 32) body key of one token (lane): per group s_g * sum q'_i c_i + b_g * sum q'_i.
// SM: b is a staged page in shared memory (decode_pages.cuh).
template <int D, int R, int BITS, bool SM = false, int MODE = kModeAny, typename Smem>
__device__ __forceinline__ void KChannelsToken(const Smem& sm, const BodySrc& b, const DevTensor& x,
                                               int slot, float* sc) {
  constexpr int NG = D / 32;
  constexpr int NW = NG * BITS;
  uint32_t w[NW];
  LoadWords<NW, SM>(reinterpret_cast<const uint32_t*>(b.codes) + slot * NW, w);
  float s[NG], z[NG];
  LoadScaleZero<NG, SM, MODE>(b, x, slot * NG, s, z);
  if constexpr (R == 1) {
    // one row: integer products on the codes as bytes with q' as 16-bit fixed point (code_bytes.cuh),
    // 16 dp4a per group, the scale once per group
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      uint32_t r0[4], r1[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) GroupSlots<BITS>(w + g * BITS, t, r0[t], r1[t]);
      const uint4 h0 = *reinterpret_cast<const uint4*>(&sm.qbh[g][0]);
      const uint4 h1 = *reinterpret_cast<const uint4*>(&sm.qbh[g][16]);
      const uint4 l0 = *reinterpret_cast<const uint4*>(&sm.qbl[g][0]);
      const uint4 l1 = *reinterpret_cast<const uint4*>(&sm.qbl[g][16]);
      const int hi = Dp4a8(r0, r1, h0, h1);
      const int lo = Dp4a8(r0, r1, l0, l1);
      const float dot = static_cast<float>(hi * 256 + lo) * sm.qinv;  // sum_i q'_i c_i
      const float2 ab = GroupAffineM<MODE>(BITS, x.mode, s[g], z[g]);
      sc[0] += ab.x * dot + ab.y * sm.qsum[0][g];
    }
  } else {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      float dot[R];
#pragma unroll
      for (int r = 0; r < R; ++r) dot[r] = 0.f;
#pragma unroll
      for (int i = 0; i < 32; i += 4) {
        float c[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) c[e] = UnitAt<BITS>(w + g * BITS, i + e);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float4 q = *reinterpret_cast<const float4*>(&sm.qn[r][g * 32 + i]);
          dot[r] += c[0] * q.x + c[1] * q.y + c[2] * q.z + c[3] * q.w;
        }
      }
      const float2 ab = GroupAffineM<MODE>(BITS, x.mode, s[g], z[g]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float qs = sm.qsum[r][g];
        sc[r] += ab.x * ((dot[r] - qs) * UnitScale<BITS>()) + ab.y * qs;  // dot[r] = sum q'_i u_i
      }
    }
  }
}

// along_tokens (G = 32) body keys of a whole 32-token tile (warp-cooperative, see the header).
template <int D, int R, int BITS, typename Smem>
__device__ __forceinline__ void KTokensTile(Smem& sm, int warp, int lane, const BodySrc& b,
                                            const DevTensor& x, float* sc) {
  constexpr int CPL = D / 32;
  constexpr int NW = CPL * BITS;
  auto& ws = sm.w[warp];
  const int c0 = lane * CPL;
  uint32_t w[NW];
  LoadWords<NW>(reinterpret_cast<const uint32_t*>(b.codes) + c0 * BITS, w);
  float s[CPL], z[CPL];
  LoadScaleZero<CPL, false>(b, x, c0, s, z);
#pragma unroll
  for (int j = 0; j < CPL; ++j)
#pragma unroll
    for (int i = 0; i < BITS; ++i) ws.u.k.codes[i][c0 + j] = w[j * BITS + i];
  float zt[R];
#pragma unroll
  for (int r = 0; r < R; ++r) zt[r] = 0.f;
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    const float2 ab = GroupAffine(BITS, x.mode, s[j], z[j]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      // staged 2^BITS q'_c a_c: sum_c (2^BITS q'_c a_c) u_c = sum_c q'_c a_c c_c + 2^BITS sum_c q'_c a_c,
      // the second sum leaves through the zero term
      const float qn = sm.qn[r][c0 + j];
      const float qa = (qn * ab.x) * UnitScale<BITS>();
      ws.u.k.qa[r][c0 + j] = qa;
      zt[r] += qn * ab.y - qa;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) zt[r] += __shfl_xor_sync(0xffffffffu, zt[r], o);
  }
  __syncwarp();
  const int bit = lane * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  // the word holding the code's high bits: the next one if the code crosses, else the same (rotation)
  const int wi_hi = sh + BITS > 32 ? wi + 1 : wi;
  float dot[R];
#pragma unroll
  for (int r = 0; r < R; ++r) dot[r] = 0.f;
#pragma unroll 4
  for (int c = 0; c < D; c += 4) {
    const uint4 lo = *reinterpret_cast<const uint4*>(&ws.u.k.codes[wi][c]);
    uint4 hi = lo;
    if constexpr (BITS == 3) hi = *reinterpret_cast<const uint4*>(&ws.u.k.codes[wi_hi][c]);
    float cf[4];
    cf[0] = UnitCode<BITS>(lo.x, hi.x, sh);
    cf[1] = UnitCode<BITS>(lo.y, hi.y, sh);
    cf[2] = UnitCode<BITS>(lo.z, hi.z, sh);
    cf[3] = UnitCode<BITS>(lo.w, hi.w, sh);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 qa = *reinterpret_cast<const float4*>(&ws.u.k.qa[r][c]);
      dot[r] += cf[0] * qa.x + cf[1] * qa.y + cf[2] * qa.z + cf[3] * qa.w;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) sc[r] = dot[r] + zt[r];
  __syncwarp();  // the staged tile is consumed before the next tile overwrites it
}

// along_tokens (G = 32) body values of a whole 32-token tile: lane = CPL channels. The loads
// (codes of CPL groups, their scales and zeros) are issued at the start of the tile.
template <int D>
struct VTokRaw {
  uint32_t w[D / 32 * 4];
  float s[D / 32], z[D / 32];
};

template <int D, int BITS, bool SM = false, int MODE = kModeAny>
__device__ __forceinline__ void VTokensLoad(int lane, const BodySrc& b, const DevTensor& x, VTokRaw<D>& raw) {
  constexpr int CPL = D / 32;
  const int c0 = lane * CPL;
  LoadWords<CPL * BITS, SM>(reinterpret_cast<const uint32_t*>(b.codes) + c0 * BITS, raw.w);
  LoadScaleZero<CPL, SM, MODE>(b, x, c0, raw.s, raw.z);
}

template <int D, int R, int BITS, int MODE = kModeAny, typename Smem>
__device__ __forceinline__ void VTokensCompute(const Smem& sm, int warp, const DevTensor& x,
                                               const VTokRaw<D>& raw, const float* psum, float punit,
                                               float (*acc)[D / 32]) {
  constexpr int CPL = D / 32;
  const auto& ws = sm.w[warp];
  if constexpr (R == 1) {
    // one row: integer products of the codes as bytes with p as 16-bit fixed point (ws.pb) in
    // units of punit (the tile's largest p is kFixedScale)
    const uint4 h0 = *reinterpret_cast<const uint4*>(&ws.pb[0][0]);
    const uint4 h1 = *reinterpret_cast<const uint4*>(&ws.pb[0][16]);
    const uint4 l0 = *reinterpret_cast<const uint4*>(&ws.pb[1][0]);
    const uint4 l1 = *reinterpret_cast<const uint4*>(&ws.pb[1][16]);
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      uint32_t r0[4], r1[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) GroupSlots<BITS>(raw.w + j * BITS, t, r0[t], r1[t]);
      const int hi = Dp4a8(r0, r1, h0, h1);
      const int lo = Dp4a8(r0, r1, l0, l1);
      const float v = static_cast<float>(hi * 256 + lo) * punit;  // sum_t p_t c_t
      const float2 ab = GroupAffineM<MODE>(BITS, x.mode, raw.s[j], raw.z[j]);
      acc[0][j] += ab.x * v + ab.y * psum[0];
    }
  } else {
    float dot[R][CPL];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < CPL; ++j) dot[r][j] = 0.f;
#pragma unroll
    for (int t = 0; t < 32; t += 4) {
      float cf[4][CPL];
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int j = 0; j < CPL; ++j) cf[e][j] = UnitAt<BITS>(raw.w + j * BITS, t + e);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 p = *reinterpret_cast<const float4*>(&ws.P()[r][t]);
#pragma unroll
        for (int j = 0; j < CPL; ++j) dot[r][j] += p.x * cf[0][j] + p.y * cf[1][j] + p.z * cf[2][j] + p.w * cf[3][j];
      }
    }
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const float2 ab = GroupAffineM<MODE>(BITS, x.mode, raw.s[j], raw.z[j]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // dot[r][j] = sum_t p_t u_t = psum + 2^-BITS sum_t p_t c_t
        acc[r][j] += ab.x * ((dot[r][j] - psum[r]) * UnitScale<BITS>()) + ab.y * psum[r];
      }
    }
  }
}

// Values token by token (full-precision tokens and along_channels body tokens): lane = CPL
// channels. The loads of up to kVBatch tokens go out together (2 words per token and lane: the
// activations, or the pre-shifted code word and the group's scale | zero << 16).
template <int D, bool BODY, typename Smem>
__device__ __forceinline__ void VPerTokenIssue(const Smem& sm, int warp, int lane, const uint8_t* arena,
                                               const DevTensor& x, int h, int j0,
                                               int nvalid, uint32_t* raw0, uint32_t* raw1) {
  constexpr int CPL = D / 32;
  const auto& ws = sm.w[warp];
  const int c0 = lane * CPL;
  const int bits = x.bits;
  const int sh = ((c0 % 32) * bits) & 31;
  const int wofs = ((c0 % 32) * bits) >> 5;
#pragma unroll
  for (int j = 0; j < kVBatch; ++j) {
    raw0[j] = 0u;
    raw1[j] = 0u;
    if (j < nvalid) {
      const int64_t page = ws.VPage()[j0 + j];
      const int slot = ws.VSlot()[j0 + j];
      if (BODY && ws.VBody()[j0 + j]) {
        const uint8_t* head = arena + page + static_cast<int64_t>(h) * x.head_bytes;
        const int g = slot * (D / 32) + c0 / 32;
        const uint32_t* cw = reinterpret_cast<const uint32_t*>(head) + g * bits + wofs;
        // this lane's CPL codes may cross into the next word (3 bits)
        const uint32_t hi = sh + CPL * bits > 32 ? __ldg(cw + 1) : 0u;
        raw0[j] = __funnelshift_r(__ldg(cw), hi, sh);
        const uint32_t sb = __ldg(reinterpret_cast<const unsigned short*>(head + x.scales_offset) + g);
        const uint32_t zb =
            x.has_zeros ? __ldg(reinterpret_cast<const unsigned short*>(head + x.zeros_offset) + g) : 0u;
        raw1[j] = sb | (zb << 16);
      } else {
        const uint8_t* row = arena + page + FullTokenOffset(slot, h, D) + c0 * 2;
        if constexpr (CPL == 4) {
          const uint2 v = __ldg(reinterpret_cast<const uint2*>(row));
          raw0[j] = v.x;
          raw1[j] = v.y;
        } else {
          raw0[j] = __ldg(reinterpret_cast<const uint32_t*>(row));
        }
      }
    }
  }
}

template <int D, DType DT, int R, bool BODY, typename Smem>
__device__ __forceinline__ void VPerTokenCompute(const Smem& sm, int warp, const DevTensor& x, int j0, int nvalid,
                                                 const uint32_t* raw0, const uint32_t* raw1,
                                                 float (*acc)[D / 32]) {
  constexpr int CPL = D / 32;
  const auto& ws = sm.w[warp];
  const int bits = x.bits;
  const uint32_t mask = (1u << (bits & 31)) - 1u;
#pragma unroll
  for (int j = 0; j < kVBatch; ++j) {
    if (j < nvalid) {
      float v[CPL];
      if (BODY && ws.VBody()[j0 + j]) {
        const float s = __half2float(__ushort_as_half(static_cast<unsigned short>(raw1[j] & 0xffffu)));
        const float z = __half2float(__ushort_as_half(static_cast<unsigned short>(raw1[j] >> 16)));
        const float2 ab = GroupAffine(bits, x.mode, s, z);
#pragma unroll
        for (int e = 0; e < CPL; ++e) v[e] = CodeToFloat((raw0[j] >> (e * bits)) & mask) * ab.x + ab.y;
      } else {
        v[0] = ActToFloat<DT>(static_cast<uint16_t>(raw0[j] & 0xffffu));
        v[1] = ActToFloat<DT>(static_cast<uint16_t>(raw0[j] >> 16));
        if constexpr (CPL == 4) {
          v[2] = ActToFloat<DT>(static_cast<uint16_t>(raw1[j] & 0xffffu));
          v[3] = ActToFloat<DT>(static_cast<uint16_t>(raw1[j] >> 16));
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float p = ws.P()[r][j0 + j];
#pragma unroll
        for (int e = 0; e < CPL; ++e) acc[r][e] += p * v[e];
      }
    }
  }
}

// along_channels (G = 32) body values of a whole 32-token tile. Lane = token loads its token's
// code words (16-byte loads) and its groups' scale / zero; after the scores they go to the warp's
// shared memory as words and (a, b), and P.V reads them with lane = CPL channels.
template <int D>
struct VChRaw {
  uint32_t w[D / 32 * 4];
  float s[D / 32], z[D / 32];
};

template <int D, int BITS>
__device__ __forceinline__ void VChannelsLoad(const BodySrc& b, const DevTensor& x, int slot, VChRaw<D>& raw) {
  constexpr int NG = D / 32;
  LoadWords<NG * BITS>(reinterpret_cast<const uint32_t*>(b.codes) + slot * NG * BITS, raw.w);
  LoadScaleZero<NG, false>(b, x, slot * NG, raw.s, raw.z);
}

template <int D, int BITS, typename Smem>
__device__ __forceinline__ void VChannelsStage(Smem& sm, int warp, int lane, const DevTensor& x,
                                               const VChRaw<D>& raw) {
  constexpr int NG = D / 32;
  auto& ws = sm.w[warp];
#pragma unroll
  for (int i = 0; i < NG * BITS; ++i) ws.u.v.codes[lane][i] = raw.w[i];
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    // a c + b = (2^BITS a) u + (b - 2^BITS a) with u = 1 + c 2^-BITS (UnitCode)
    const float2 ab = GroupAffine(BITS, x.mode, raw.s[g], raw.z[g]);
    const float a2 = ab.x * UnitScale<BITS>();
    ws.u.v.ab[lane][g] = make_float2(a2, ab.y - a2);
  }
}

template <int D, int R, int BITS, typename Smem>
__device__ __forceinline__ void VChannelsCompute(const Smem& sm, int warp, int lane, float (*acc)[D / 32]) {
  constexpr int CPL = D / 32;
  const auto& ws = sm.w[warp];
  const int c0 = lane * CPL;
  const int bit = (c0 % 32) * BITS;
  const int wi = (c0 / 32) * BITS + (bit >> 5);
  const int sh = bit & 31;
  const int g = c0 / 32;
#pragma unroll 2
  for (int j0 = 0; j0 < 32; j0 += 4) {
    float p[R][4];  // p of 4 tokens per 16-byte read
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 p4 = *reinterpret_cast<const float4*>(&ws.P()[r][j0]);
      p[r][0] = p4.x;
      p[r][1] = p4.y;
      p[r][2] = p4.z;
      p[r][3] = p4.w;
    }
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = j0 + jj;
      uint32_t word = ws.u.v.codes[j][wi];
      if constexpr (BITS == 3) word = __funnelshift_r(word, ws.u.v.codes[j][wi + 1 < D / 32 * 4 ? wi + 1 : wi], sh);
      else word >>= sh;
      const float2 ab = ws.u.v.ab[j][g];
      float v[CPL];
#pragma unroll
      for (int e = 0; e < CPL; ++e) v[e] = UnitCode<BITS>(word, word, e * BITS) * ab.x + ab.y;
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int e = 0; e < CPL; ++e) acc[r][e] += p[r][jj] * v[e];
      }
    }
  }
}

// Global source of the body tile of x that starts at body offset u0 (a multiple of 32), KV head h.
template <int D>
__device__ __forceinline__ BodySrc BodyTileSrc(const uint8_t* arena, const int64_t* pages, const DevTensor& x,
                                               int h, int u0) {
  const uint8_t* head = arena + pages[x.body_pages + u0 / kPageTokens] + static_cast<int64_t>(h) * x.head_bytes;
  const int slot0 = u0 % kPageTokens;
  const int gb = x.grouping == static_cast<int>(Grouping::kAlongChannels) ? slot0 * (D / 32) : (slot0 / 32) * D;
  return BodySrc{head + gb * x.words_per_group * 4, head + x.scales_offset + 2 * gb, head + x.zeros_offset + 2 * gb};
}

// A staged body tile in shared memory: codes, scales, zeros back to back (BodyTileBytes).
template <int D>
__device__ __forceinline__ BodySrc StagedSrc(const uint8_t* base, const DevTensor& x) {
  const int cb = 4 * D * x.bits;
  return BodySrc{base, base + cb, base + cb + 2 * D};
}

// Warp-wide copy of one BITS-bit body tile into shared memory (16-byte cp.async, L2 only), every
// size known at compile time: the codes in whole or predicated warp-wide steps, then the scales
// and the zeros (contiguous when staged) as one step of 2 x 2D / 16 lanes; the caller commits.
template <int D, int BITS>
__device__ __forceinline__ void StageBodyTile(uint8_t* dst, const BodySrc& g, bool has_zeros, int lane) {
  constexpr int kCodes = 4 * D * BITS;
  constexpr int kSz = 2 * D / 16;  // 16-byte chunks of the scales (and of the zeros)
  static_assert(2 * kSz <= 32, "scales and zeros in one warp-wide step");
  const uint8_t* src = g.codes + lane * 16;  // per-lane pointers, compile-time steps (immediates)
  uint8_t* d = dst + lane * 16;
#pragma unroll
  for (int it = 0; it < (kCodes + 511) / 512; ++it) {
    if (kCodes % 512 == 0 || it * 512 + lane * 16 < kCodes) CpAsync16(d + it * 512, src + it * 512);
  }
  if (lane < kSz || (has_zeros && lane < 2 * kSz)) {
    const uint8_t* src = lane < kSz ? g.scales + lane * 16 : g.zeros + (lane - kSz) * 16;
    CpAsync16(dst + kCodes + lane * 16, src);
  }
}

// The K and V body tiles at body offset u0 into one ring slot (K first, V at k_tile_bytes), or
// nothing when !valid (past the unit's end); one commit group either way.
template <int D, int KB, int VB>
__device__ __forceinline__ void StageBodyPair(uint8_t* dst, const AttnArgs& a, const DevSeq& s, int h, int u0,
                                              int k_tile_bytes, bool valid, int lane) {
  if (valid) {
    StageBodyTile<D, KB>(dst, BodyTileSrc<D>(a.arena, a.pages, s.k, h, u0), s.k.has_zeros != 0, lane);
    StageBodyTile<D, VB>(dst + k_tile_bytes, BodyTileSrc<D>(a.arena, a.pages, s.v, h, u0), s.v.has_zeros != 0,
                         lane);
  }
  CpAsyncCommit();
}

// kvq-bench --unit-trace: the units' phase stamps (AttnArgs::unit_trace, kUnitTraceSlots), in
// kernels built with KVQ_UNIT_TRACE only; the other builds have no trace code at all.
#if defined(KVQ_UNIT_TRACE)
constexpr bool kUnitTrace = true;
#else
constexpr bool kUnitTrace = false;
#endif
__device__ __forceinline__ void UnitStamp(const AttnArgs& a, int slot, int64_t value) {
  if constexpr (kUnitTrace) {
    if (a.unit_trace) a.unit_trace[static_cast<int64_t>(blockIdx.x) * kUnitTraceSlots + slot] = value;
  }
}
__device__ __forceinline__ void UnitStamp(const AttnArgs& a, int slot) {
  if constexpr (kUnitTrace) UnitStamp(a, slot, QaGlobalTimer());
}
// The per-token tiles' phase clocks: the SM's cycle counter read once x (a value the phase ends
// with) is computed, and the warps' sums added to slots 8.. (step_desc.h).
__device__ __forceinline__ int64_t TileClock(float x) {
#if defined(__CUDA_ARCH__)
  int64_t c;
  asm volatile("{\n\t.reg .f32 t;\n\tmov.f32 t, %1;\n\tmov.u64 %0, %%clock64;\n\t}" : "=l"(c) : "f"(x) : "memory");
  return c;
#else
  (void)x;
  return QaClock();
#endif
}
__device__ __forceinline__ void UnitTraceAdd(const AttnArgs& a, int slot, int64_t value) {
#if defined(KVQ_UNIT_TRACE)
  if (a.unit_trace)
    atomicAdd(reinterpret_cast<unsigned long long*>(a.unit_trace + static_cast<int64_t>(blockIdx.x) * kUnitTraceSlots + slot),
              static_cast<unsigned long long>(value));
#else
  (void)a, (void)slot, (void)value;
#endif
}

// The fused merge, in the item's last unit: its rows' partials combined by every warp of the block,
// wpr = kDecWarps / rows warps per row (1 from 4 rows up, the rows then in passes of 4), each over
// every wpr-th unit of its row. A lane loads each of its units' (m, l) together with its share of
// the unit's partial row, up to 8 units in flight, and keeps an online maximum; the warps of a row
// meet in shared memory (sm.w[w].u.o, sm.m, sm.l: free once the unit's own partial is written).
// MergeItemRows' arithmetic up to the order of the sums. Why: the merge ends the launch, so its
// chain of round trips to L2 is exposed; MergeItemRows (one warp per row) reads the (m, l) pairs
// twice (the maximum, then the weights) before the partial rows go out eight at a time: 3.8-4.7 us
// per merge at (1,32,32,32768), the unit trace (docs/gpu_notes.md). Called by every thread.
template <int D, DType DT, int R, typename Smem>
__device__ __forceinline__ void MergeItemBlock(Smem& sm, const DevMergeItem& it, const DevSeq& s, const AttnArgs& a,
                                               int tid) {
  static_assert(D % 4 == 0 && D <= 128, "a unit's row is at most one float4 per lane");
  constexpr int kLanesPerUnit = D / 4;
  constexpr int kUnitsPerStep = 32 / kLanesPerUnit;  // units side by side in a warp (2 at D = 64)
  constexpr int K = 8;                               // units per lane in flight
  const int warp = tid >> 5, lane = tid & 31;
  const int rows = it.num_rows;
  const int wpr = rows >= kDecWarps ? 1 : kDecWarps / rows;
  const int rpp = kDecWarps / wpr;  // rows per pass
  const int k = warp % wpr;
  const int sub = lane / kLanesPerUnit;
  const int c = (lane % kLanesPerUnit) * 4;
  const int n = it.num_units;
  const int stride = wpr * kUnitsPerStep;  // between a lane's units
  for (int pass = 0; pass * rpp < rows; ++pass) {
    const int r = pass * rpp + warp / wpr;
    float m = -INFINITY, l = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < rows) {  // warp-uniform
      const float2* ml = reinterpret_cast<const float2*>(a.part_ml) + static_cast<int64_t>(it.unit0) * kRowsPerUnit + r;
      const float* po = a.part_o + (static_cast<int64_t>(it.unit0) * kRowsPerUnit + r) * D + c;
      for (int u0 = k * kUnitsPerStep; u0 < n; u0 += K * stride) {
        float2 x[K];
        float4 v[K];
#pragma unroll
        for (int i = 0; i < K; ++i) {
          const int u = u0 + sub + i * stride;
          if (u < n) {
            x[i] = __ldcg(ml + static_cast<int64_t>(u) * kRowsPerUnit);
            v[i] = __ldcg(reinterpret_cast<const float4*>(po + static_cast<int64_t>(u) * kRowsPerUnit * D));
          } else {
            x[i] = make_float2(-INFINITY, 0.f);
            v[i] = make_float4(0.f, 0.f, 0.f, 0.f);
          }
        }
        float mm = m;
#pragma unroll
        for (int i = 0; i < K; ++i) mm = fmaxf(mm, x[i].x);
        if (mm != -INFINITY) {  // (a unit that saw none of the row's tokens: m = -inf, l = 0, weight 0)
          const float sc = m == -INFINITY ? 0.f : exp2f(m - mm);
          l *= sc;
          acc.x *= sc;
          acc.y *= sc;
          acc.z *= sc;
          acc.w *= sc;
#pragma unroll
          for (int i = 0; i < K; ++i) {
            const float w = x[i].x == -INFINITY ? 0.f : exp2f(x[i].x - mm);
            l += w * x[i].y;
            acc.x += w * v[i].x;
            acc.y += w * v[i].y;
            acc.z += w * v[i].z;
            acc.w += w * v[i].w;
          }
          m = mm;
        }
      }
    }
    // the units side by side in the warp (D = 64) into one state
#pragma unroll
    for (int off = kLanesPerUnit; off < 32; off <<= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m, off);
      const float lo = __shfl_xor_sync(0xffffffffu, l, off);
      float4 ao;
      ao.x = __shfl_xor_sync(0xffffffffu, acc.x, off);
      ao.y = __shfl_xor_sync(0xffffffffu, acc.y, off);
      ao.z = __shfl_xor_sync(0xffffffffu, acc.z, off);
      ao.w = __shfl_xor_sync(0xffffffffu, acc.w, off);
      const float mm = fmaxf(m, mo);
      const float s0 = m == -INFINITY ? 0.f : exp2f(m - mm), s1 = mo == -INFINITY ? 0.f : exp2f(mo - mm);
      l = l * s0 + lo * s1;
      acc.x = acc.x * s0 + ao.x * s1;
      acc.y = acc.y * s0 + ao.y * s1;
      acc.z = acc.z * s0 + ao.z * s1;
      acc.w = acc.w * s0 + ao.w * s1;
      m = mm;
    }
    if (wpr > 1) {  // block-uniform (rows <= 2: one pass): the row's warps meet
      if (sub == 0) {
        float* x = &sm.w[warp].u.o[0][c];
        x[0] = acc.x;
        x[1] = acc.y;
        x[2] = acc.z;
        x[3] = acc.w;
      }
      if (lane == 0) {
        sm.m[warp][0] = m;
        sm.l[warp][0] = l;
      }
      __syncthreads();
      if (k == 0) {
        float mm = -INFINITY;
        for (int kk = 0; kk < wpr; ++kk) mm = fmaxf(mm, sm.m[warp + kk][0]);
        l = 0.f;
        acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int kk = 0; kk < wpr; ++kk) {
          const float mk = sm.m[warp + kk][0];
          const float w = mk == -INFINITY ? 0.f : exp2f(mk - mm);
          const float* x = &sm.w[warp + kk].u.o[0][c];
          l += w * sm.l[warp + kk][0];
          acc.x += w * x[0];
          acc.y += w * x[1];
          acc.z += w * x[2];
          acc.w += w * x[3];
        }
      }
    }
    if (k == 0 && sub == 0 && r < rows) StoreMergedRow<D, DT>(it, s, a.o, a.num_q_heads, a.group, r, c, acc, l);
  }
}

// The end of a unit: the 4 warps' partial states (sm.m, sm.l, sm.w[w].u.o, written before the
// block barrier) become the unit's unnormalized (o, m, l).
// kBlockMerge: the item's last unit merges with MergeItemBlock (every instance but the KIVI code
// units'), else with MergeItemRows. H100, same call against MergeItemRows everywhere
// (raw/2026-12-06g/call3): one-row and small shapes 1-4% faster (innerq (1,9,3,8192) 18.2 -> 17.5
// us, (1,32,32,4096) 23.3 -> 22.9, (1,32,32,32768) 59.0 -> 58.3), but the KIVI code units 1.4-2.2%
// slower at every shape (kivi2 (16,32,8,32768) 252.1 -> 255.8), their registers unchanged.
template <int D, DType DT, int R, bool kBlockMerge = true, typename Smem>
__device__ __forceinline__ void DecodeEpilogue(Smem& sm, const AttnArgs& a, const DevSeq& s, const DevUnit& unit,
                                               int tid) {
  const int part = unit.part;
  if (kUnitTrace && tid == 0) UnitStamp(a, 5);
  // per row: the combined max, each warp's weight 2^(m_w - m) (0 for a warp that saw no token),
  // and the combined l; then every output element is one weighted sum over the warps
  if (tid < R) {
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) mm = fmaxf(mm, sm.m[w][tid]);
    float ll = 0.f;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) {
      const float mw = sm.m[w][tid];
      const float wt = mm == -INFINITY || mw == -INFINITY ? 0.f : exp2f(mw - mm);
      sm.wt[w][tid] = wt;
      ll += wt * sm.l[w][tid];
    }
    float* pm = a.part_ml + (static_cast<int64_t>(part) * kRowsPerUnit + tid) * 2;
    pm[0] = mm;
    pm[1] = ll;
  }
  __syncthreads();
  float* po = a.part_o + static_cast<int64_t>(part) * kRowsPerUnit * D;
  for (int idx = tid; idx < R * D; idx += kDecThreads) {
    const int r = idx / D;
    const int c = idx % D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) o += sm.wt[w][r] * sm.w[w].u.o[r][c];
    po[r * D + c] = o;
  }
  // Fused merge: the partial is visible device-wide before this unit counts itself; the item's
  // last unit to count (threadFenceReduction pattern) combines every partial of the item.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const DevMergeItem& it = a.items[unit.item];
    sm.merge_last = atomicAdd(a.merge_count + unit.item, 1) == it.num_units - 1 ? 1 : 0;
    if (kUnitTrace) UnitStamp(a, 6);
  }
  __syncthreads();
  if (sm.merge_last) {
    __threadfence();
    const DevMergeItem it = a.items[unit.item];
    if constexpr (kBlockMerge) {
      MergeItemBlock<D, DT, R>(sm, it, s, a, tid);
    } else {
      MergeItemRows<D, DT>(it, s, a.part_o, a.part_ml, a.o, a.num_q_heads, a.group, tid, kDecThreads);
    }
    if (tid == 0) a.merge_count[unit.item] = 0;  // ready for the next launch
  }
  if (kUnitTrace && tid == 0) {
    if (sm.merge_last) UnitStamp(a, 7);
    UnitStamp(a, 0, QaSmId() | int64_t{unit.kind} << 8 | int64_t{UnitWaitsForQuantizeAppend(s, unit)} << 12 |
                        int64_t{sm.merge_last != 0} << 13 |
                        int64_t{unit.tok_end - unit.tok_begin - (unit.skip_end - unit.skip_begin)} << 16);
  }
}

}  // namespace cuda
}  // namespace kvq

#include "decode_pages.cuh"  // uses the helpers above
#include "decode_imma.cuh"   // uses the helpers above and decode_pages.cuh
#include "decode_mma.cuh"

namespace kvq {
namespace cuda {

// One row, along_channels (KIVI) value tile of 2 or 4 bits as dp4a products. Per token and group
// the value is a c + b, so sum_t p_t (a_t c_t + b_t) = sum_t (p_t a_t) c_t + sum_t p_t b_t: lane =
// token computes p a and p b per group, p a becomes 16-bit fixed point per (tile, group) (bytes in
// token order, next to the staged words) and sum p b a warp sum; then lane = CPL channels gathers
// its codes of 4 tokens into one register per channel (shifts + PRMT) and runs 2 dp4a per channel
// and 4 tokens. unit[g] is group g's fixed-point unit, zsum[g] its sum_t p_t b_t (warp-uniform).
template <int D, int BITS, typename Smem>
__device__ __forceinline__ void VChannelsStageDp4a(Smem& sm, int warp, int lane, const DevTensor& x,
                                                   const VChRaw<D>& raw, float* unit, float* zsum) {
  constexpr int NG = D / 32;
  auto& ws = sm.w[warp];
#pragma unroll
  for (int i = 0; i < NG * BITS; ++i) ws.u.v.codes[lane][i] = raw.w[i];
  uint8_t* pab = reinterpret_cast<uint8_t*>(&ws.u.v.ab[0][0]);  // [NG][high, low][32 tokens]
  const float p = ws.P()[0][lane];
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const float2 ab = GroupAffine(BITS, x.mode, raw.s[g], raw.z[g]);  // a >= 0
    const float pa = p * ab.x;
    float mx = pa, sb = p * ab.y;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      sb += __shfl_xor_sync(0xffffffffu, sb, o);
    }
    const float xs = mx > 0.f ? pa * (kFixedScale / mx) : 0.f;
    pab[(2 * g) * 32 + lane] = static_cast<uint8_t>(FixedByte(xs, false));
    pab[(2 * g + 1) * 32 + lane] = static_cast<uint8_t>(FixedByte(xs, true));
    unit[g] = mx / kFixedScale;
    zsum[g] = sb;
  }
}

template <int D, int BITS, typename Smem>
__device__ __forceinline__ void VChannelsComputeDp4a(const Smem& sm, int warp, int lane, const float* unit,
                                                     const float* zsum, float (*acc)[D / 32]) {
  static_assert(BITS == 2 || BITS == 4, "2 or 4 bits: a lane's codes sit inside one word");
  constexpr int CPL = D / 32;
  constexpr int NG = D / 32;
  const auto& ws = sm.w[warp];
  const int c0 = lane * CPL;
  const int g = c0 / 32;
  const int bit = (c0 % 32) * BITS;
  const int wi = g * BITS + (bit >> 5);
  const int sh = bit & 31;
  const uint8_t* pab = reinterpret_cast<const uint8_t*>(&ws.u.v.ab[0][0]);
  int hi[CPL], lo[CPL];
#pragma unroll
  for (int e = 0; e < CPL; ++e) hi[e] = lo[e] = 0;
#pragma unroll 4
  for (int k = 0; k < 32; k += 4) {
    const uint32_t x0 = ws.u.v.codes[k][wi] >> sh, x1 = ws.u.v.codes[k + 1][wi] >> sh;
    const uint32_t x2 = ws.u.v.codes[k + 2][wi] >> sh, x3 = ws.u.v.codes[k + 3][wi] >> sh;
    // byte j of g0 (g1) = byte 0 (1) of token k + j's shifted word
    const uint32_t g0 = __byte_perm(__byte_perm(x0, x1, 0x0040), __byte_perm(x2, x3, 0x0040), 0x5410);
    uint32_t q[CPL];
    if constexpr (BITS == 2) {
#pragma unroll
      for (int e = 0; e < CPL; ++e) q[e] = (g0 >> (2 * e)) & 0x03030303u;
    } else {
      q[0] = g0 & 0x0F0F0F0Fu;
      q[1] = (g0 >> 4) & 0x0F0F0F0Fu;
      if constexpr (CPL == 4) {
        const uint32_t g1 = __byte_perm(__byte_perm(x0, x1, 0x0051), __byte_perm(x2, x3, 0x0051), 0x5410);
        q[2] = g1 & 0x0F0F0F0Fu;
        q[3] = (g1 >> 4) & 0x0F0F0F0Fu;
      }
    }
    const int ph = *reinterpret_cast<const int*>(pab + (2 * g) * 32 + k);
    const int pl = *reinterpret_cast<const int*>(pab + (2 * g + 1) * 32 + k);
#pragma unroll
    for (int e = 0; e < CPL; ++e) {
      hi[e] = __dp4a(static_cast<int>(q[e]), ph, hi[e]);
      lo[e] = __dp4a(static_cast<int>(q[e]), pl, lo[e]);
    }
  }
  float u = 0.f, z = 0.f;  // this lane's group (no dynamic indexing of register arrays)
#pragma unroll
  for (int gg = 0; gg < NG; ++gg) {
    if (gg == g) {
      u = unit[gg];
      z = zsum[gg];
    }
  }
#pragma unroll
  for (int e = 0; e < CPL; ++e) acc[0][e] += static_cast<float>(hi[e] * 256 + lo[e]) * u + z;
}

// Register caps (resident blocks per SM): R = 1: 5 (96 registers; ptxas -v: 0-140 bytes of
// spills depending on the family), R = 4: 3 (168), R = 8: 2. Measured against R = 1: 4 and
// R = 1: 6 on the H100 (docs/gpu_notes.md): mixed, this is the best for the quantized presets.
template <int R>
constexpr int DecodeMinBlocks() { return R == 1 ? 5 : R <= 4 ? 3 : 2; }

// IMMA: the InnerQ 4-row instance for batches with tensor-core body units, capped at 4 blocks per
// SM (128 registers; the ring's shared memory allows 4 at two stages): the IMMA path needs fewer
// registers than the 4-row per-token path, which here serves only the short units around the
// bodies (ptxas: ~156 bytes of spills). Measured against a 96-register cap: 4 blocks either way,
// 1-3% faster at 128 (docs/gpu_notes.md).
// IMMA on the fp16 family: every unit on the fp16 / bf16 tensor cores (decode_mma.cuh); the ring
// (16 KB per warp and stage at D = 128) bounds the block count, not registers. On the KIVI family
// (body units of decode_mma_kivi.cuh, 4 and 8 rows): 2 blocks, so the per-token path that serves
// the units around the bodies in the same launch does not spill.
// The KIVI code units (decode_kivi_codes.cuh) keep no tile in registers or a work area: 5 / 4 / 3
// blocks at 1 / 4 / 8 rows, as the per-token instances (the ring, ~3 KB per stage and warp at
// D = 128 and 2 bits, fits).
// The one-row InnerQ instance with page units (decode_pages.cuh) keeps the per-token instance's
// 96-register cap (5 blocks), which its per-token units need.
template <int PATHS, int R, bool IMMA>
constexpr int DecodeLaunchMinBlocks() {
  return IMMA ? (PATHS == kFamFull              ? 1
                 : PATHS == kFamKivi            ? 2
                 : PATHS == kFamKiviCodes       ? (R <= 4 ? 4 : 3)
                 : R == 1                       ? DecodeMinBlocks<1>()
                                                : 4)
              : DecodeMinBlocks<R>();
}

// (the fp16 tensor-core instance returns before the per-token loop: nvcc's "loop is not
// reachable" for it is expected)
// ---- The fused step (AttnArgs::fused): the quantize-append inside the attention launch, run by
// the first unit of each (sequence, KV head) that reads what it writes.

#if defined(KVQ_CUDA_EMU)
#define KVQ_NOINLINE
#else
#define KVQ_NOINLINE __noinline__
#endif

// The quantize-append of head h of sequence seq, K and V, by a whole attention block: half 0 (64
// threads) runs QaGrid blocks z = 0, 2, ... (the K chunks), half 1 z = 1, 3, ... (V); err: the
// calling warp's scratch. Not inlined: the attention instances' registers stay their own. (No
// phase trace here: kvq-bench --qa-trace covers the quantize-append launched on its own.)
static __device__ KVQ_NOINLINE void FusedQuantizeAppend(QaArgs qa, int seq, int h, int chunks, int tid, float* err) {
  static_assert(kDecThreads == 2 * kQaThreads, "two quantize-append blocks side by side per attention block");
  for (int z = tid / kQaThreads; z < 2 * chunks; z += 2) QuantizeAppendBlock(qa, seq, h, z, chunks, tid % kQaThreads, err);
}

// A unit that reads what the step writes (block-uniform): the first of its head to get here runs
// the head's quantize-append and marks it done; the others wait for the mark (its owner already
// runs, so the wait ends). `owner` and `err` are the block's shared scratch.
__device__ __forceinline__ void FusedStepOwnOrWait(const AttnArgs& a, int seq, int h, int* owner, float* err) {
  uint32_t* claim = a.item_sync + 2 * (static_cast<int64_t>(seq) * a.num_kv_heads + h);
  if (threadIdx.x == 0) *owner = atomicExch(claim, a.epoch) != a.epoch ? 1 : 0;
  __syncthreads();
  if (*owner) {
    FusedQuantizeAppend(a.qa, seq, h, a.qa_chunks, threadIdx.x, err);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicExch(claim + 1, a.epoch);
    return;
  }
#if defined(KVQ_CUDA_EMU)
  // blocks run one after another here: the owner has finished
  if (claim[1] != a.epoch) kvq_emu::LaunchError("fused step: a unit waits for a quantize-append that no unit ran");
#else
  if (threadIdx.x == 0) {
    uint32_t done;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(done) : "l"(claim + 1) : "memory");
      if (done == a.epoch) break;
      __nanosleep(32);
    }
  }
  __syncthreads();
  __threadfence();  // every thread's reads come after the owner's writes
#endif
}

// The InnerQ body units' (K, V) bits (ImmaBits: 2/2, 3/2, 3/3; the plan makes IMMA and page units
// only for those): f(kb, vb) with both as std::integral_constant.
template <typename F>
__device__ __forceinline__ void InnerQBits(const DevSeq& s, F&& f) {
  if (s.k.bits == 2) {
    f(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
  } else if (s.v.bits == 2) {
    f(std::integral_constant<int, 3>{}, std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 3>{}, std::integral_constant<int, 3>{});
  }
}

// The presets' tensor modes for InnerQ bits (KB, VB) (innerq2: hybrid 2-bit keys and values;
// innerq: sym 3-bit keys, hybrid 2-bit values; innerq_base: sym 3-bit both) as compile-time
// arguments of f where a sequence has them, kModeAny (the modes read at run time) elsewhere.
template <int KB, int VB, typename F>
__device__ __forceinline__ void PresetModes(const DevSeq& s, F&& f) {
  constexpr int KM = KB == 2 ? kModeHybrid : kModeSym;
  constexpr int VM = VB == 2 ? kModeHybrid : kModeSym;
  if (s.k.mode == KM && s.v.mode == VM) {
    f(std::integral_constant<int, KM>{}, std::integral_constant<int, VM>{});
  } else {
    f(std::integral_constant<int, kModeAny>{}, std::integral_constant<int, kModeAny>{});
  }
}

#pragma nv_diag_suppress 128
// Whether every token of the tile [t0, t0 + 32) below the unit's end is in full precision in both
// tensors: below the body (b0), or past both flushed bodies (full_from).
__device__ __forceinline__ bool FullTile(int t0, int tok_end, int b0, int full_from) {
  return min(t0 + 32, tok_end) <= b0 || t0 >= full_from;
}

// This warp's full-precision tiles of a per-token unit (FullTile) on the tensor cores
// (MmaTokTiles), before the per-token loop, which then continues from the state this leaves in the
// warp's places (sm.m, sm.l, the warp area's o) and steps over them; skip: the loop's walk over the
// unit's tiles (past the body that other units take). Returns whether there was any.
// (Not inlined, it cost more: the call's saved registers took the instance's stack from 112 to 288 bytes.)
// (Unit trace builds: each warp's cycles in the tiles and their count, slots 13 and 14.)
template <int D, DType DT, int R, typename Smem, typename Skip>
__device__ __forceinline__ bool MmaTokTilesPass(Smem& sm, const AttnArgs& a, const DevSeq& s, const DevUnit& unit,
                                                Skip skip, int warp, int lane, int b0, int full_from) {
  static_assert(sizeof(sm.w[0].u) >= MmaTokTiles<D, DT, R>::KS * 32 * sizeof(uint2),
                "the query fragments fit the warp's area");
  auto& ws = sm.w[warp];
  const int h = unit.kv_head;
  MmaTokTiles<D, DT, R> mt;
  bool any = false;  // (warp-uniform)
  int64_t cycles = 0;
  int tiles = 0;
  for (int tile0 = skip(unit.tok_begin + warp * 32); tile0 < unit.tok_end; tile0 = skip(tile0 + kDecWarps * 32)) {
    if (!FullTile(tile0, unit.tok_end, b0, full_from)) continue;
    if (!any) mt.Init(sm.q, sm.pos, reinterpret_cast<uint2*>(&ws.u), lane);
    any = true;
    const int64_t clk = kUnitTrace ? TileClock(0.f) : 0;
    const int t = tile0 + lane;
    int64_t koff = -1, voff = -1;
    if (t < unit.tok_end) {
      const TokLoc kl = Locate(s, s.k, a.pages, t);
      const TokLoc vl = Locate(s, s.v, a.pages, t);
      koff = kl.page + FullTokenOffset(kl.slot, h, D);
      voff = vl.page + FullTokenOffset(vl.slot, h, D);
    }
    mt.Tile(a.arena, koff, voff, tile0, unit.tok_end, a.scale_log2, lane);
    if constexpr (kUnitTrace) {
      cycles += TileClock(mt.o[0][0]) - clk;
      ++tiles;
    }
  }
  if (any) mt.Finish(sm, warp, lane);
  if constexpr (kUnitTrace) {
    if (lane == 0 && tiles > 0) {
      UnitTraceAdd(a, 13, cycles);
      UnitTraceAdd(a, 14, tiles);
    }
  }
  return any;
}

template <int D, DType DT, int R, int PATHS, bool IMMA = false>
__global__ void __launch_bounds__(kDecThreads, DecodeLaunchMinBlocks<PATHS, R, IMMA>()) DecodeKernel(AttnArgs a) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(R >= 1 && R <= kRowsPerUnit, "rows per unit");
  constexpr int CPL = D / 32;
  constexpr int NG = D / 32;
  __shared__ __align__(16) DecSmem<D, R, PATHS> sm;
  __shared__ __align__(16) DevSeq seq_s;
#if defined(KVQ_CUDA_EMU)
  uint8_t* const dec_ring = kvq_emu::DynamicShared() + a.ring_offset;
#else
  // [warp][stage][ring_slot_bytes], 128-byte aligned: at 16 the rings began where the static memory
  // ended, 16 bytes off a 32-byte unit in the one-row instance, and a global sector whose halves land
  // in two units is fetched from L2 twice (one-row fp16 0.88x on an H100, docs/gpu_notes.md)
  extern __shared__ __align__(128) uint8_t dec_ring_base[];
  uint8_t* const dec_ring = dec_ring_base + a.ring_offset;
#endif

  if (kUnitTrace && threadIdx.x == 0) UnitStamp(a, 1);
  bool early_page = false;  // thread 0: this page unit's first page is on its way (PageRingEarlyStart)
  if constexpr (IMMA && PATHS == kFamInnerQ) {
    if (threadIdx.x == 0 && a.first_pages) early_page = PageRingEarlyStart(a, dec_ring);
  }
  const DevUnit unit = a.units[blockIdx.x];
  LoadSeqToShared<kDecThreads>(a.seqs + unit.seq, &seq_s);
  __syncthreads();
  if (kUnitTrace && threadIdx.x == 0) UnitStamp(a, 2);
  // Only a unit whose tiles meet the quantize-append's writes (new sink or window tokens, flushed
  // body tokens) waits for it; the others read what was complete before it started (step_desc.h).
  if (UnitWaitsForQuantizeAppend(seq_s, unit)) {
    if (a.fused) {
      static_assert(sizeof(sm.w[0].u) >= kFusedErrBytes, "the flush's error sums fit a warp's area");
      FusedStepOwnOrWait(a, unit.seq, unit.kv_head, &sm.qa_owner, reinterpret_cast<float*>(&sm.w[threadIdx.x >> 5].u));
    } else {
      GridDependencyWait();
    }
  }
  if (a.trigger_dependents) GridDependentsLaunchAfterWait();  // the next step's flush may start (AttnArgs)
  if (kUnitTrace && threadIdx.x == 0) UnitStamp(a, 3);
  const DevSeq& s = seq_s;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int h = unit.kv_head;
  if constexpr (IMMA && PATHS == kFamInnerQ) {  // page units: the first pages go out before the query's set-up
    if (unit.kind == kUnitPages && tid == 0) PageRingStart(a, s, unit, dec_ring, early_page);
  }

  for (int idx = tid; idx < R * D; idx += kDecThreads) {
    const int r = idx / D;
    const int c = idx % D;
    const float qv = UnitQuery<D, DT>(a.q, a.num_q_heads, a.group, s, unit, r, c);
    const float f = s.key_norm ? reinterpret_cast<const float*>(a.arena + s.norm_offset)[h * D + c] : 1.f;
    sm.q[r][c] = qv;
    sm.qn[r][c] = qv * f;
  }
  if (tid < R) sm.pos[tid] = tid < unit.num_rows ? s.length - s.n_new + (unit.row0 + tid) / a.group : -1;
  __syncthreads();
  for (int idx = tid; idx < R * NG; idx += kDecThreads) {
    const int r = idx / NG;
    const int g = idx % NG;
    float sum = 0.f;
    for (int i = 0; i < 32; ++i) sum += sm.qn[r][g * 32 + i];
    sm.qsum[r][g] = sum;
  }
  __syncthreads();

  if constexpr (R == 1 && (PATHS & kPathKCh) != 0) {
    // q' as 16-bit fixed-point bytes in slot order for the along_channels keys (KChannelsToken)
    if (s.k.grouping == static_cast<int>(Grouping::kAlongChannels) && s.k.mode != static_cast<int>(QuantMode::kFull)) {
      if (warp == 0) {
        float mx = 0.f;
        for (int c = lane; c < D; c += 32) mx = fmaxf(mx, fabsf(sm.qn[0][c]));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        if (lane == 0) sm.qinv = mx / kFixedScale;
      }
      __syncthreads();
      const float qs = sm.qinv > 0.f ? 1.f / sm.qinv : 0.f;
      for (int idx = tid; idx < NG * 32; idx += kDecThreads) {
        const int g = idx / 32;
        const int k = idx % 32;
        const float x = sm.qn[0][g * 32 + SlotPhys(s.k.bits, k)] * qs / static_cast<float>(1 << SlotShift(s.k.bits, k));
        sm.qbh[g][k] = static_cast<uint8_t>(FixedByte(x, false));
        sm.qbl[g][k] = static_cast<uint8_t>(FixedByte(x, true));
      }
      __syncthreads();
    }
  }
  if constexpr (IMMA && PATHS == kFamFull) {
    MmaFullUnit<D, DT, R>(sm, a, s, unit, dec_ring + warp * DecodeWarpRingBytes(a), warp, lane);
    __syncthreads();
    DecodeEpilogue<D, DT, R>(sm, a, s, unit, tid);
    return;
  } else if constexpr (IMMA && PATHS == kFamKivi) {
    if (unit.kind == kUnitImmaBody) {  // the plan made it only for the (K, V) bits instantiated here
      uint8_t* ring = dec_ring + warp * DecodeWarpRingBytes(a);
      if (s.k.bits == 2) {
        MmaKiviBodyUnit<D, DT, R, 2, 2>(sm, a, s, unit, ring, warp, lane);
      } else {
        MmaKiviBodyUnit<D, DT, R, 4, 4>(sm, a, s, unit, ring, warp, lane);
      }
      __syncthreads();
      DecodeEpilogue<D, DT, R>(sm, a, s, unit, tid);
      return;
    }
  } else if constexpr (IMMA && PATHS == kFamKiviCodes) {
    if (unit.kind == kUnitImmaBody) {  // the plan made it only for 2- or 4-bit asym K and V
      uint8_t* ring = dec_ring + warp * DecodeWarpRingBytes(a);
      if (s.k.bits == 2) {
        KiviCodesBodyUnit<D, R, 2>(sm, a, s, unit, ring, warp, lane);
      } else {
        KiviCodesBodyUnit<D, R, 4>(sm, a, s, unit, ring, warp, lane);
      }
      __syncthreads();
      DecodeEpilogue<D, DT, R, false>(sm, a, s, unit, tid);
      return;
    }
  } else if constexpr (IMMA && R == 1) {
    static_assert(PATHS == kFamInnerQ, "the one-row InnerQ tensor-core instance: page units");
    if (unit.kind == kUnitPages) {  // the plan made it only for the (K, V) bits instantiated here
      InnerQBits(s, [&](auto kb, auto vb) {
        constexpr int KB = decltype(kb)::value, VB = decltype(vb)::value;
        PresetModes<KB, VB>(s, [&](auto km, auto vm) {
          PageBodyUnit<D, KB, VB, decltype(km)::value, decltype(vm)::value>(sm, a, s, unit, dec_ring, warp, lane);
        });
      });
      __syncthreads();
      DecodeEpilogue<D, DT, R>(sm, a, s, unit, tid);
      return;
    }
  } else if constexpr (IMMA) {
    static_assert(PATHS == kFamInnerQ && R == 4, "the IMMA instance is the InnerQ 4-row one");
    if (unit.kind == kUnitImmaBody) {  // the plan made it only for the (K, V) bits instantiated here
      uint8_t* ring = dec_ring + warp * DecodeWarpRingBytes(a);
      // the warp rings' units keep the modes read per tile: their launches are the small ones
      // ((1,9,3,8192)), where the preset instances measured 3-5% slower (why is not measured)
      InnerQBits(s, [&](auto kb, auto vb) {
        ImmaBodyUnit<D, R, decltype(kb)::value, decltype(vb)::value, false, kModeAny, kModeAny>(sm, a, s, unit, ring,
                                                                                               warp, lane);
      });
      __syncthreads();
      DecodeEpilogue<D, DT, R>(sm, a, s, unit, tid);
      return;
    }
    if (unit.kind == kUnitPages) {  // the same tiles from the block's ring of whole pages
      InnerQBits(s, [&](auto kb, auto vb) {
        constexpr int KB = decltype(kb)::value, VB = decltype(vb)::value;
        PresetModes<KB, VB>(s, [&](auto km, auto vm) {
          ImmaBodyUnit<D, R, KB, VB, true, decltype(km)::value, decltype(vm)::value>(sm, a, s, unit, dec_ring, warp, lane);
        });
      });
      __syncthreads();
      DecodeEpilogue<D, DT, R>(sm, a, s, unit, tid);
      return;
    }
  }

  int pos[R];
#pragma unroll
  for (int r = 0; r < R; ++r) pos[r] = sm.pos[r];
  float m[R], l[R], acc[R][CPL];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) acc[r][j] = 0.f;
  }
  const int b0 = s.sink_len + s.to_sink;
  const int kb1 = b0 + s.k.body_len + s.k.flush;
  const int vb1 = b0 + s.v.body_len + s.v.flush;
  const bool k_tok = (PATHS & kPathKTok) && s.k.grouping == static_cast<int>(Grouping::kAlongTokens);
  const bool v_tok = (PATHS & kPathVTok) && s.v.grouping == static_cast<int>(Grouping::kAlongTokens);
  const bool v_ch = (PATHS & kPathVCh) && s.v.grouping == static_cast<int>(Grouping::kAlongChannels);
  auto& ws = sm.w[warp];
  // full-precision key rows by lane quads (KFullTileQuads) from 4 rows up at head_dim 128, except in
  // the KIVI code units' instances, where the quads' registers spill. At head_dim 64 (a row is one
  // cache line) they measured 1-2% slower at (1,9,3,8192) on an H100 (docs/gpu_notes.md)
  constexpr bool kKeyQuads = D == 128 && R >= 4 && !(IMMA && PATHS == kFamKiviCodes);
  // full-precision tiles on the tensor cores (MmaTokTiles): the around units of the 4-row InnerQ and
  // KIVI code units' tensor-core instances at head_dim 128. With the bodies first (the plan's rule
  // for these instances, step_runner.cc) innerq2 at (64,32,8,8192) took 206 -> 192 us; at head_dim
  // 64 ((1,9,3,8192)) the instances measured 2-7% slower with them (H100, docs/gpu_notes.md)
  constexpr bool kMmaTiles = D == 128 && IMMA && (PATHS == kFamInnerQ || PATHS == kFamKiviCodes) && R == 4;
  // R = 1, along_tokens V: the slot of this lane's token in the value bytes (code_bytes.cuh)
  const int pslot = SlotOf(s.v.bits, lane);
  const int pshift = SlotShift(s.v.bits, pslot);

  // The warp's tiles: every 4th from tok_begin + 32 warp, stepping over [skip_begin, skip_end)
  // (the body tiles that tensor-core units of the same item take) in steps of 4 tiles. Loads go
  // straight from global memory to registers: staging these tiles through the IMMA units' cp.async
  // ring was measured no faster and cost resident blocks (docs/gpu_notes.md, d8).
  auto skip = [&](int t0) {
    return t0 >= unit.skip_begin && t0 < unit.skip_end
               ? t0 + (unit.skip_end - t0 + kDecWarps * 32 - 1) / (kDecWarps * 32) * (kDecWarps * 32)
               : t0;
  };
  // The tiles in full precision for both tensors (below the body, or past both flushed bodies) on
  // the tensor cores first (MmaTokTiles), where this instance has them and the launch asks
  // (AttnArgs::mma_tiles); the loop below continues from their state and steps over them.
  // (The full tiles are a prefix and a suffix of the warp's walk: the loop below takes the tiles
  // between them, [tile_first, tile_stop).)
  int tile_first = skip(unit.tok_begin + warp * 32);
  int tile_stop = unit.tok_end;
  if constexpr (kMmaTiles) {
    const int full_from = max(kb1, vb1);
    if (a.mma_tiles == 0) {
    } else if (MmaTokTilesPass<D, DT, R>(sm, a, s, unit, skip, warp, lane, b0, full_from)) {
      __syncwarp();
#pragma unroll
      for (int r = 0; r < R; ++r) {
        m[r] = sm.m[warp][r];
        l[r] = sm.l[warp][r];
#pragma unroll
        for (int j = 0; j < CPL; ++j) acc[r][j] = ws.u.o[r][lane * CPL + j];
      }
      __syncwarp();  // read before the loop's tiles write the warp's area
    }
    if (a.mma_tiles != 0) {
      while (tile_first < tile_stop && FullTile(tile_first, unit.tok_end, b0, full_from))
        tile_first = skip(tile_first + kDecWarps * 32);
      tile_stop = min(tile_stop, full_from);
    }
  }
  int64_t tph[4] = {0, 0, 0, 0}, tclk = 0;
  int tiles = 0;
  for (int tile0 = tile_first; tile0 < tile_stop; tile0 = skip(tile0 + kDecWarps * 32)) {
    if constexpr (kUnitTrace) {
      tclk = TileClock(0.f);
      ++tiles;
    }
    const int t = tile0 + lane;
    const bool in = t < unit.tok_end;
    float sc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) sc[r] = 0.f;
    // ---- scores (lane = token)
    if (k_tok && tile0 >= b0 && tile0 < kb1) {  // an along_tokens body tile is whole
      if constexpr (DecSmem<D, R, PATHS>::kKiviTiles) {  // (k_tok is false without them)
        const BodySrc kb = BodyTileSrc<D>(a.arena, a.pages, s.k, h, tile0 - b0);
        switch (s.k.bits) {
          case 2: KTokensTile<D, R, 2>(sm, warp, lane, kb, s.k, sc); break;
          case 3: KTokensTile<D, R, 3>(sm, warp, lane, kb, s.k, sc); break;
          default: KTokensTile<D, R, 4>(sm, warp, lane, kb, s.k, sc); break;
        }
      }
    } else {
      int64_t koff = -1;  // kKeyQuads: this lane's full-precision key row, read by the lane quads
      if (in) {
        const TokLoc kl = Locate(s, s.k, a.pages, t);
        if ((PATHS & kPathKCh) && kl.body) {
          const uint8_t* head = a.arena + kl.page + static_cast<int64_t>(h) * s.k.head_bytes;
          const BodySrc kb{head, head + s.k.scales_offset, head + s.k.zeros_offset};
          switch (s.k.bits) {
            case 2: KChannelsToken<D, R, 2>(sm, kb, s.k, kl.slot, sc); break;
            case 3: KChannelsToken<D, R, 3>(sm, kb, s.k, kl.slot, sc); break;
            default: KChannelsToken<D, R, 4>(sm, kb, s.k, kl.slot, sc); break;
          }
        } else if constexpr (kKeyQuads) {
          koff = kl.page + FullTokenOffset(kl.slot, h, D);
        } else {
          KFullToken<D, DT, R>(sm, a.arena + kl.page + FullTokenOffset(kl.slot, h, D), sc);
        }
      }
      if constexpr (kKeyQuads) {
        if (__any_sync(0xffffffffu, koff >= 0)) KFullTileQuads<D, DT, R>(sm, a.arena, koff, lane, sc);
      }
    }
    if constexpr (kUnitTrace) {
      const int64_t c = TileClock(sc[0]);
      tph[0] += c - tclk;
      tclk = c;
    }
    // ---- online softmax per warp (lane = token)
    float psum[R], punit = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool valid = in && t <= pos[r];
      const float x = valid ? sc[r] * a.scale_log2 : -INFINITY;
      float mx = x;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[r], mx);
      const float p = m_new == -INFINITY ? 0.f : Exp2Ftz(x - m_new);
      float sum = p;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const float alpha = m[r] == -INFINITY ? 0.f : Exp2Ftz(m[r] - m_new);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
#pragma unroll
      for (int j = 0; j < CPL; ++j) acc[r][j] *= alpha;
      psum[r] = sum;
      ws.P()[r][lane] = p;
      if constexpr (R == 1 && (PATHS & kPathVTok) != 0) {
        // fixed point relative to the warp tile's largest p (not the running maximum's 1): the
        // tile keeps 15 bits however far below the maximum of a long unit its scores lie
        const float xp = valid ? Exp2Ftz(x - mx) * (kFixedScale / static_cast<float>(1 << pshift)) : 0.f;
        ws.pb[0][pslot] = static_cast<uint8_t>(FixedByte(xp, false));
        ws.pb[1][pslot] = static_cast<uint8_t>(FixedByte(xp, true));
        punit = mx == -INFINITY ? 0.f : Exp2Ftz(mx - m_new) * (1.f / kFixedScale);
      }
    }
    if constexpr (kUnitTrace) {
      const int64_t c = TileClock(l[0]);
      tph[1] += c - tclk;
      tclk = c;
    }
    // ---- V loads after the scores: hoisting them above the scores cost registers, hence resident
    // warps, and was slower on the H100 (docs/gpu_notes.md, v3 -> v4)
    const bool vt = v_tok && tile0 >= b0 && tile0 < vb1;
    const int nvalid = min(32, unit.tok_end - tile0);
    const int vbits = s.v.bits;
    // a whole tile of along_channels body values (tiles across the body's end go token by token)
    const bool vc = v_ch && tile0 >= b0 && tile0 + 32 <= vb1;
    VTokRaw<D> vraw;
    VChRaw<D> vchraw;
    uint32_t raw0[kVBatch], raw1[kVBatch];
    if (vc || vt) {  // whole body tiles
      const BodySrc vb = BodyTileSrc<D>(a.arena, a.pages, s.v, h, tile0 - b0);
      if (vc) {
        switch (vbits) {
          case 2: VChannelsLoad<D, 2>(vb, s.v, lane, vchraw); break;
          case 3: VChannelsLoad<D, 3>(vb, s.v, lane, vchraw); break;
          default: VChannelsLoad<D, 4>(vb, s.v, lane, vchraw); break;
        }
      } else {
        switch (vbits) {
          case 2: VTokensLoad<D, 2>(lane, vb, s.v, vraw); break;
          case 3: VTokensLoad<D, 3>(lane, vb, s.v, vraw); break;
          default: VTokensLoad<D, 4>(lane, vb, s.v, vraw); break;
        }
      }
    } else {
      if (in) {
        const TokLoc vl = Locate(s, s.v, a.pages, t);
        ws.VPage()[lane] = vl.page;
        ws.VSlot()[lane] = vl.slot;
        ws.VBody()[lane] = vl.body;
      }
    }
    if constexpr (kUnitTrace) {
      __syncwarp();
      const int64_t c = TileClock(static_cast<float>(ws.VSlot()[lane]));
      tph[2] += c - tclk;
      tclk = c;
    }
    // ---- P.V (lane = CPL channels)
    // one row, 2 or 4 bits: the along_channels tile as dp4a products (VChannelsStageDp4a)
    const bool vc_dp4a = R == 1 && vc && vbits != 3;
    float vunit[NG], vzsum[NG];
    if constexpr (DecSmem<D, R, PATHS>::kKiviTiles) {  // (vc is false without them)
      if (vc_dp4a) {
        if (vbits == 2) {
          VChannelsStageDp4a<D, 2>(sm, warp, lane, s.v, vchraw, vunit, vzsum);
        } else {
          VChannelsStageDp4a<D, 4>(sm, warp, lane, s.v, vchraw, vunit, vzsum);
        }
      } else if (vc) {
        switch (vbits) {
          case 2: VChannelsStage<D, 2>(sm, warp, lane, s.v, vchraw); break;
          case 3: VChannelsStage<D, 3>(sm, warp, lane, s.v, vchraw); break;
          default: VChannelsStage<D, 4>(sm, warp, lane, s.v, vchraw); break;
        }
      }
    }
    __syncwarp();
    if (vc_dp4a) {
      if constexpr (DecSmem<D, R, PATHS>::kKiviTiles) {
        if (vbits == 2) {
          VChannelsComputeDp4a<D, 2>(sm, warp, lane, vunit, vzsum, acc);
        } else {
          VChannelsComputeDp4a<D, 4>(sm, warp, lane, vunit, vzsum, acc);
        }
      }
    } else if (vc) {
      if constexpr (DecSmem<D, R, PATHS>::kKiviTiles) {
        switch (vbits) {
          case 2: VChannelsCompute<D, R, 2>(sm, warp, lane, acc); break;
          case 3: VChannelsCompute<D, R, 3>(sm, warp, lane, acc); break;
          default: VChannelsCompute<D, R, 4>(sm, warp, lane, acc); break;
        }
      }
    } else if (vt) {
      switch (vbits) {
        case 2: VTokensCompute<D, R, 2>(sm, warp, s.v, vraw, psum, punit, acc); break;
        case 3: VTokensCompute<D, R, 3>(sm, warp, s.v, vraw, psum, punit, acc); break;
        default: VTokensCompute<D, R, 4>(sm, warp, s.v, vraw, psum, punit, acc); break;
      }
    } else {
      // token by token, kVBatch tokens' loads in flight at a time
#pragma unroll 1
      for (int j0 = 0; j0 < nvalid; j0 += kVBatch) {
        VPerTokenIssue<D, (PATHS & kPathVCh) != 0>(sm, warp, lane, a.arena, s.v, h, j0, min(kVBatch, nvalid - j0), raw0, raw1);
        VPerTokenCompute<D, DT, R, (PATHS & kPathVCh) != 0>(sm, warp, s.v, j0, min(kVBatch, nvalid - j0), raw0, raw1, acc);
      }
    }
    if constexpr (kUnitTrace) tph[3] += TileClock(acc[0][0]) - tclk;
    __syncwarp();  // p and the V locations are consumed before the next tile writes them
  }
  if constexpr (kUnitTrace) {
    if (lane == 0 && tiles > 0) {
      for (int i = 0; i < 4; ++i) UnitTraceAdd(a, 8 + i, tph[i]);
      UnitTraceAdd(a, 12, tiles);
    }
  }

  // ---- the 4 warps' partial states meet once
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      sm.m[warp][r] = m[r];
      sm.l[warp][r] = l[r];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < CPL; ++j) ws.u.o[r][lane * CPL + j] = acc[r][j];
  __syncthreads();
  DecodeEpilogue<D, DT, R, !(IMMA && PATHS == kFamKiviCodes)>(sm, a, s, unit, tid);
}

#pragma nv_diag_default 128

// The ring's dynamic shared memory; above the default 48 KB the kernel must opt in first. Runners
// on several streams (the store's lanes) plan concurrently: the check, the attribute and the
// recorded size change together under a lock, so the recorded size never exceeds the one set.
template <int D, DType DT, int R, int PATHS, bool IMMA>
cudaError_t DecodeRingOptIn(int ring_bytes) {
  static std::atomic<int> opted{0};
  static std::mutex mu;
  if (ring_bytes <= opted.load(std::memory_order_acquire)) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mu);
  if (ring_bytes <= opted.load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(DecodeKernel<D, DT, R, PATHS, IMMA>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, ring_bytes);
  if (e == cudaSuccess) opted.store(ring_bytes, std::memory_order_release);
  return e;
}

// The kernel's static shared memory, a property of the binary: asked once (the plan probes up to
// six ring depths per step, and a spread launch pads against it); -1 where it cannot be read.
template <int D, DType DT, int R, int PATHS, bool IMMA = false>
int64_t DecodeStaticSmem() {
  static std::atomic<int64_t> static_smem{-1};
  if (static_smem.load(std::memory_order_relaxed) < 0) {
    cudaFuncAttributes fa{};
    if (cudaFuncGetAttributes(&fa, DecodeKernel<D, DT, R, PATHS, IMMA>) != cudaSuccess) {
      (void)cudaGetLastError();
      return -1;
    }
    static_smem.store(static_cast<int64_t>(fa.sharedSizeBytes), std::memory_order_relaxed);
  }
  return static_smem.load(std::memory_order_relaxed);
}

template <int D, DType DT, int R, int PATHS, bool IMMA = false>
int DecodeBlocksPerSmT(int ring_bytes) {
  // A ring the device cannot give one block is 0 blocks, without asking for it (the plan probes
  // deeper rings than fit, and a refused opt-in is an API error that tools report). Answers are
  // remembered per (device, ring size): the plan asks every step (OccupancyMemo).
  static OccupancyMemo memo;
  int dev = 0, optin = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (memo.Find(dev, ring_bytes, &n)) return n;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const int64_t static_smem = DecodeStaticSmem<D, DT, R, PATHS, IMMA>();
  if (static_smem < 0) return 0;
  if (static_smem + ring_bytes > optin) {
    memo.Put(dev, ring_bytes, 0);
    return 0;
  }
  if (DecodeRingOptIn<D, DT, R, PATHS, IMMA>(ring_bytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, DecodeKernel<D, DT, R, PATHS, IMMA>, kDecThreads,
                                                    ring_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  memo.Put(dev, ring_bytes, n);
  return n;
}

// Dynamic shared memory for a launch whose blocks no SM may hold more than `cap` of: ring_bytes,
// padded so that cap + 1 blocks exceed the SM's shared memory (cap blocks still fit). ring_bytes
// unchanged where the padding would not fit a block or the attributes cannot be read.
template <int D, DType DT, int R, int PATHS, bool IMMA = false>
int DecodeCappedDynamicSmem(int ring_bytes, int cap) {
  int dev = 0, sm_bytes = 0, reserved = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sm_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return ring_bytes;
  }
  const int64_t static_smem = DecodeStaticSmem<D, DT, R, PATHS, IMMA>();
  const int64_t per_block = sm_bytes / (cap + 1) + 1;  // cap + 1 of these exceed the SM
  const int64_t dyn = per_block - static_smem - reserved;
  if (static_smem < 0 || dyn <= ring_bytes || dyn + static_smem > optin || static_cast<int64_t>(cap) * per_block > sm_bytes)
    return ring_bytes;
  return static_cast<int>(dyn);
}

template <int D, DType DT, int R, int PATHS, bool IMMA = false>
cudaError_t LaunchDecodeT(const AttnArgs& args, int num_units, cudaStream_t stream) {
  if (num_units <= 0) return cudaSuccess;
  int ring_bytes = PATHS == kFamFull && !IMMA ? 0 : DecodeRingBytes(args);
#if !defined(KVQ_CUDA_EMU)
  if (args.sm_block_cap > 0) ring_bytes = DecodeCappedDynamicSmem<D, DT, R, PATHS, IMMA>(ring_bytes, args.sm_block_cap);
#endif
  const cudaError_t e = DecodeRingOptIn<D, DT, R, PATHS, IMMA>(ring_bytes);
  if (e != cudaSuccess) return e;
  return LaunchAttnKernel(DecodeKernel<D, DT, R, PATHS, IMMA>, num_units, kDecThreads, ring_bytes, stream, args);
}

template <int D, DType DT, int R>
cudaError_t LaunchDecodeFam(const AttnArgs& args, int paths, int num_units, cudaStream_t stream) {
  if ((paths & kDecodeImmaUnits) && DecodeFamily(paths) == kFamFull)
    return LaunchDecodeT<D, DT, R, kFamFull, true>(args, num_units, stream);
  if ((paths & kDecodeImmaUnits) && (paths & kDecodeKiviCodeUnits) && DecodeFamily(paths) == kFamKivi)
    return LaunchDecodeT<D, DT, R, kFamKiviCodes, true>(args, num_units, stream);
  if constexpr (R >= 4) {
    if ((paths & kDecodeImmaUnits) && DecodeFamily(paths) == kFamKivi)
      return LaunchDecodeT<D, DT, R, kFamKivi, true>(args, num_units, stream);
  }
  if constexpr (R == 4 || R == 1) {  // 4 rows: IMMA body units; one row: page units
    if ((paths & kDecodeImmaUnits) && DecodeFamily(paths) == kFamInnerQ)
      return LaunchDecodeT<D, DT, R, kFamInnerQ, true>(args, num_units, stream);
  }
  switch (DecodeFamily(paths)) {
    case kFamFull: return LaunchDecodeT<D, DT, R, kFamFull>(args, num_units, stream);
    case kFamInnerQ: return LaunchDecodeT<D, DT, R, kFamInnerQ>(args, num_units, stream);
    case kFamKivi: return LaunchDecodeT<D, DT, R, kFamKivi>(args, num_units, stream);
    default: return LaunchDecodeT<D, DT, R, kFamAll>(args, num_units, stream);
  }
}

template <int D, DType DT, int R>
int DecodeBlocksPerSmFam(int paths, int ring_bytes) {
  if ((paths & kDecodeImmaUnits) && DecodeFamily(paths) == kFamFull)
    return DecodeBlocksPerSmT<D, DT, R, kFamFull, true>(ring_bytes);
  if ((paths & kDecodeImmaUnits) && (paths & kDecodeKiviCodeUnits) && DecodeFamily(paths) == kFamKivi)
    return DecodeBlocksPerSmT<D, DT, R, kFamKiviCodes, true>(ring_bytes);
  if constexpr (R >= 4) {
    if ((paths & kDecodeImmaUnits) && DecodeFamily(paths) == kFamKivi)
      return DecodeBlocksPerSmT<D, DT, R, kFamKivi, true>(ring_bytes);
  }
  if constexpr (R == 4 || R == 1) {
    if ((paths & kDecodeImmaUnits) && DecodeFamily(paths) == kFamInnerQ)
      return DecodeBlocksPerSmT<D, DT, R, kFamInnerQ, true>(ring_bytes);
  }
  switch (DecodeFamily(paths)) {
    case kFamFull: return DecodeBlocksPerSmT<D, DT, R, kFamFull>(0);
    case kFamInnerQ: return DecodeBlocksPerSmT<D, DT, R, kFamInnerQ>(ring_bytes);
    case kFamKivi: return DecodeBlocksPerSmT<D, DT, R, kFamKivi>(ring_bytes);
    default: return DecodeBlocksPerSmT<D, DT, R, kFamAll>(ring_bytes);
  }
}

#define KVQ_DECODE_INSTANTIATE(SUFFIX, D, DT)                                              \
  cudaError_t LaunchDecode##SUFFIX(const AttnArgs& args, int rows, int paths, int num_units, \
                                   cudaStream_t stream) {                                  \
    switch (DecodeRowClass(rows)) {                                                        \
      case 1: return LaunchDecodeFam<D, DT, 1>(args, paths, num_units, stream);            \
      case 4: return LaunchDecodeFam<D, DT, 4>(args, paths, num_units, stream);            \
      default: return LaunchDecodeFam<D, DT, kRowsPerUnit>(args, paths, num_units, stream);\
    }                                                                                      \
  }                                                                                        \
  int DecodeBlocksPerSm##SUFFIX(int rows, int paths, int ring_bytes) {                     \
    switch (DecodeRowClass(rows)) {                                                        \
      case 1: return DecodeBlocksPerSmFam<D, DT, 1>(paths, ring_bytes);                    \
      case 4: return DecodeBlocksPerSmFam<D, DT, 4>(paths, ring_bytes);                    \
      default: return DecodeBlocksPerSmFam<D, DT, kRowsPerUnit>(paths, ring_bytes);        \
    }                                                                                      \
  }

}  // namespace cuda
}  // namespace kvq
