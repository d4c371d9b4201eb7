// Decode fast path, InnerQ page units (included by decode.cuh).
//
// A page unit (DevUnit::kind == kUnitPages, in the InnerQ tensor-core instances) holds whole body
// pages of both K and V of one KV head: its tokens start on a page (the body's first token is
// slot 0 of body page 0) and are a multiple of kPageTokens. A head's part of a quantized page is
// one contiguous, 16-byte aligned run (codes, scales, zeros: format.h), so one page of K and V is
// two bulk copies (cp.async.bulk), issued by one thread into a ring of page slots in the block's
// dynamic shared memory, each slot with an mbarrier that counts the bytes in. The four warps take
// one 32-token tile each of every page (warp w: slots 32 w .. 32 w + 31) and compute it from shared
// memory: one row with the per-token path's integer products (KChannelsToken, VTokensCompute), 2-4
// rows with the IMMA units' tensor-core tile (ImmaBodyUnit<..., PAGES>, decode_imma.cuh). The warps
// do not meet: each counts itself done with a slot, and the last one of a page refills the slot
// with the page ring_stages pages ahead (a block barrier per page held every warp to the slowest
// and issued the refill late: 14% of the stall samples at (1,32,32,32768), H100).
//
// Why: the per-token path loads each tile from global memory into registers, so a warp waits on
// DRAM twice per tile, and ~5 resident warps per scheduler (96 registers) do not hide it (0.44-0.46
// issued instructions per scheduler-cycle at (1,32,32,32768), docs/gpu_notes.md); per-warp rings
// filled by cp.async or per-tile bulk copies cost more issue slots than they hid (d11; the
// thirteenth session's bulk ring: ~200 instructions per tile to issue five small copies). A page is
// 12-14 KB of one head, so here a tile's share of the issue is half a copy.
//
// Dynamic shared memory: [ring_stages][kDecWarps * ring_slot_bytes] page slots (K's head run, then
// V's), then ring_stages mbarriers (PageRingBars) and ring_stages counts of the warps done with the
// slot's page (PageRingDone); the plan sizes ring_slot_bytes as a quarter page rounded up to 16
// bytes and ring_work_bytes for the rest (PageSlotBytes, kPageWorkBytes).
#pragma once

namespace kvq {
namespace cuda {

static_assert(kMaxRingStages * 12 <= kDecWarps * kPageWorkBytes, "the page ring's mbarriers and counts fit");

__device__ __forceinline__ int PageSlotStride(const AttnArgs& a) { return kDecWarps * a.ring_slot_bytes; }
__device__ __forceinline__ uint64_t* PageRingBars(const AttnArgs& a, uint8_t* ring) {
  return reinterpret_cast<uint64_t*>(ring + a.ring_stages * PageSlotStride(a));
}
__device__ __forceinline__ int* PageRingDone(const AttnArgs& a, uint8_t* ring) {
  return reinterpret_cast<int*>(PageRingBars(a, ring) + a.ring_stages);
}

// Thread 0: page j of the unit (K and V of head h) into slot j % ring_stages.
__device__ __forceinline__ void PageIssue(const AttnArgs& a, const DevSeq& s, const DevUnit& unit, uint8_t* ring,
                                          int j) {
  const int p = (unit.tok_begin - (s.sink_len + s.to_sink)) / kPageTokens + j;
  const int slot = j % a.ring_stages;
  const int64_t kpage = __ldg(a.pages + s.k.body_pages + p);
  const int64_t vpage = __ldg(a.pages + s.v.body_pages + p);
  const uint32_t kbytes = static_cast<uint32_t>(s.k.head_bytes), vbytes = static_cast<uint32_t>(s.v.head_bytes);
  uint8_t* dst = ring + slot * PageSlotStride(a);
  uint64_t* bar = PageRingBars(a, ring) + slot;
  MbarArriveExpectTx(bar, kbytes + vbytes);
  BulkCopy(dst, a.arena + kpage + static_cast<int64_t>(unit.kv_head) * kbytes, kbytes, bar);
  BulkCopy(dst + kbytes, a.arena + vpage + static_cast<int64_t>(unit.kv_head) * vbytes, vbytes, bar);
}

__device__ __forceinline__ void PageRingInit(const AttnArgs& a, uint8_t* ring) {
  uint64_t* bars = PageRingBars(a, ring);
  int* done = PageRingDone(a, ring);
  for (int i = 0; i < a.ring_stages; ++i) {
    MbarInit(bars + i, 1);
    done[i] = 0;
  }
  MbarInitFence();
}

// Thread 0, as the block starts (AttnArgs::first_pages): when the plan gave this block's unit an
// early first page, the barriers and that page's copies into slot 0; whether it did.
__device__ __forceinline__ bool PageRingEarlyStart(const AttnArgs& a, uint8_t* ring) {
  const DevFirstPage f = a.first_pages[blockIdx.x];
  if (f.k_bytes == 0) return false;
  PageRingInit(a, ring);
  uint64_t* bar = PageRingBars(a, ring);
  MbarArriveExpectTx(bar, static_cast<uint32_t>(f.k_bytes + f.v_bytes));
  BulkCopy(ring, a.arena + f.k_src, static_cast<uint32_t>(f.k_bytes), bar);
  BulkCopy(ring + f.k_bytes, a.arena + f.v_src, static_cast<uint32_t>(f.v_bytes), bar);
  return true;
}

// Thread 0, at the unit's start (after any wait for the quantize-append, before the query's set-up,
// whose block barriers make the initialized mbarriers and counts visible to the other threads): the
// barriers, then the first ring_stages pages; after PageRingEarlyStart (early), the rest of them.
__device__ __forceinline__ void PageRingStart(const AttnArgs& a, const DevSeq& s, const DevUnit& unit, uint8_t* ring,
                                              bool early) {
  if (!early) PageRingInit(a, ring);
  FenceProxyAsyncGlobal();  // a fused step's quantize-append wrote the pages through the generic proxy
  const int pages = (unit.tok_end - unit.tok_begin) / kPageTokens;
  for (int j = early ? 1 : 0; j < a.ring_stages && j < pages; ++j) PageIssue(a, s, unit, ring, j);
}

// The unit's pages through the ring: tile(kb, vb) computes this warp's 32-token tile of each page
// (warp w: slots 32 w .. 32 w + 31) from its K and V sources in the slot (BodySrc, as StagedSrc
// gives for a staged tile: codes, scales and zeros of the tile's first token / group row). After a
// tile the warp counts itself done with the slot; the page's last warp refills it.
template <int D, typename Tile>
__device__ __forceinline__ void PageTiles(const AttnArgs& a, const DevSeq& s, const DevUnit& unit, uint8_t* ring,
                                          int warp, int lane, Tile&& tile) {
  constexpr int NG = D / 32;
  const int pages = (unit.tok_end - unit.tok_begin) / kPageTokens;
  const int stride = PageSlotStride(a);
  uint64_t* bars = PageRingBars(a, ring);
  const int kbytes = s.k.head_bytes;
  const int kg = warp * 32 * NG;  // along_channels K: the tile's first group in the page
  const int vg = warp * D;        // along_tokens V
  int slot = 0;
  uint32_t parity = 0;
  for (int j = 0; j < pages; ++j) {
    MbarWait(bars + slot, parity);
    if (kUnitTrace && j == 0 && warp == 0 && lane == 0) UnitStamp(a, 4);
    const uint8_t* kst = ring + slot * stride;
    const uint8_t* vst = kst + kbytes;
    tile(BodySrc{kst + kg * s.k.words_per_group * 4, kst + s.k.scales_offset + 2 * kg, kst + s.k.zeros_offset + 2 * kg},
         BodySrc{vst + vg * s.v.words_per_group * 4, vst + s.v.scales_offset + 2 * vg, vst + s.v.zeros_offset + 2 * vg});
    // this warp is done with the slot (every lane's reads, and its per-tile scratch)
    __syncwarp();
    if (lane == 0 && j + a.ring_stages < pages) {
      // acq_rel: this warp's reads of the slot (ordered before lane 0's count by the __syncwarp)
      // before its count; the other warps' counts, and so their reads, before the last warp's refill
      if (AtomicAddAcqRelCta(PageRingDone(a, ring) + slot, 1) == kDecWarps - 1) {  // the page's last warp
        // the reset comes before the next round's counts: PageIssue's mbarrier arrive releases it,
        // and the warps count again only after their wait (acquire) on that arrive's phase
        PageRingDone(a, ring)[slot] = 0;
        FenceProxyAsyncShared();  // the block's reads of the slot before the bulk copy that refills it
        PageIssue(a, s, unit, ring, j + a.ring_stages);
      }
    }
    if (++slot == a.ring_stages) {
      slot = 0;
      parity ^= 1u;
    }
  }
}

// One row: the per-token path's integer products on each tile; leaves this warp's (m, l, o) for
// DecodeEpilogue as the per-token path does. KM, VM: the tensors' modes (kModeAny: read per tile).
template <int D, int KB, int VB, int KM, int VM, typename Smem>
__device__ __forceinline__ void PageBodyUnit(Smem& sm, const AttnArgs& a, const DevSeq& s, const DevUnit& unit,
                                             uint8_t* ring, int warp, int lane) {
  constexpr int CPL = D / 32;
  auto& ws = sm.w[warp];
  // this lane's token in the value bytes (code_bytes.cuh), as on the per-token path
  const int pslot = SlotOf(VB, lane);
  const float pscale = kFixedScale / static_cast<float>(1 << SlotShift(VB, pslot));
  float m = -INFINITY, l = 0.f, acc[1][CPL];
#pragma unroll
  for (int j = 0; j < CPL; ++j) acc[0][j] = 0.f;
  PageTiles<D>(a, s, unit, ring, warp, lane, [&](const BodySrc& kb, const BodySrc& vb) {
    // ---- scores (lane = token)
    float sc = 0.f;
    KChannelsToken<D, 1, KB, true, KM>(sm, kb, s.k, lane, &sc);
    // ---- online softmax (every token of a body page is visible to the row)
    const float x = sc * a.scale_log2;
    float mx = x;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_new = fmaxf(m, mx);
    const float pt = Exp2Ftz(x - mx);  // relative to the tile's maximum: the fixed-point operand keeps 15 bits
    float sum = pt;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float beta = Exp2Ftz(mx - m_new);
    const float alpha = Exp2Ftz(m - m_new);  // m = -inf on the first page: alpha = 0
    const float psum = sum * beta;
    l = l * alpha + psum;
    m = m_new;
    if (alpha != 1.f) {  // warp-uniform
#pragma unroll
      for (int c = 0; c < CPL; ++c) acc[0][c] *= alpha;
    }
    const float xp = pt * pscale;
    ws.pb[0][pslot] = static_cast<uint8_t>(FixedByte(xp, false));
    ws.pb[1][pslot] = static_cast<uint8_t>(FixedByte(xp, true));
    // ---- P.V (lane = CPL channels of the warp's value group)
    VTokRaw<D> vraw;
    VTokensLoad<D, VB, true, VM>(lane, vb, s.v, vraw);
    __syncwarp();
    VTokensCompute<D, 1, VB, VM>(sm, warp, s.v, vraw, &psum, beta * (1.f / kFixedScale), acc);
  });
  if (lane == 0) {
    sm.m[warp][0] = m;
    sm.l[warp][0] = l;
  }
#pragma unroll
  for (int c = 0; c < CPL; ++c) ws.u.o[0][lane * CPL + c] = acc[0][c];
}

}  // namespace cuda
}  // namespace kvq
