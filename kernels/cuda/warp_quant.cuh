// The quantizer of one group by a whole warp (lane = element), bit-identical to the CPU
// reference's QuantizeGroupRef + PackCodes (kvq/quant.h): the same per-element uncontracted
// arithmetic; min / max reductions that keep the first element of the extreme value, as the
// sequential loop does, so even the sign of a zero matches; the hybrid L1 errors summed in element
// order. Elements: element i = j * 32 + lane is x[j] of that lane (G = 32 * J).
//
// The warp operations go through warp:: below: the CUDA intrinsics under nvcc; on the host the
// includer defines them (tests/kernels/warp_emu.h), so tests/kernels/warp_quant_test.cc runs this
// very code on an emulated warp of 32 threads against the reference.
#pragma once

#include <cstdint>

#include "kvq/format.h"
#include "kvq/numeric.h"
#include "device_macros.h"
#include "kvq/quant.h"

namespace kvq {
namespace cuda {
namespace warp {
#if defined(__CUDACC__)
KVQ_WARP float ShflXor(float v, int off) { return __shfl_xor_sync(0xffffffffu, v, off); }
KVQ_WARP float Shfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
KVQ_WARP uint32_t Ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
KVQ_WARP bool All(bool p) { return __all_sync(0xffffffffu, p) != 0; }
KVQ_WARP uint32_t ReduceOr(uint32_t v) { return __reduce_or_sync(0xffffffffu, v); }
KVQ_WARP void Sync() { __syncwarp(); }
KVQ_WARP int FirstLane(uint32_t m) { return __ffs(m) - 1; }
// A plain store: every writer writes a non-zero code, and the flag may live in mapped host
// memory (RunStepFromHost's mapped output), where device atomics are not available over PCIe.
KVQ_WARP void SetFlag(int32_t* flag, int32_t v) { *reinterpret_cast<volatile int32_t*>(flag) = v; }
KVQ_WARP void BlockSync() { __syncthreads(); }
#else
// On the host the includer defines ShflXor, Shfl, Ballot, All, ReduceOr, Sync, SetFlag and
// BlockSync in this namespace first (tests/kernels/warp_emu.h: emulated threads).
inline int FirstLane(uint32_t m) { return m ? __builtin_ctz(m) : -1; }
#endif
}  // namespace warp

// The first element (in element order i = j * 32 + lane) whose value equals v, as the sequential
// MinF / MaxF loop leaves it: those keep the earliest of equal values, so -0 and +0 differ here.
template <int J>
KVQ_WARP float FirstEqual(const float (&x)[J], float v) {
  KVQ_UNROLL
  for (int j = 0; j < J; ++j) {
    const uint32_t m = warp::Ballot(x[j] == v);
    if (m != 0u) return warp::Shfl(x[j], warp::FirstLane(m));
  }
  return v;  // not reached: v is one of the elements
}

// Sums of a[0..n) and of b[0..n), each in element order, in fp32 (every lane gets the same values;
// n a multiple of 4): one loop for both (two independent chains of adds). kBy4: four values of
// each loaded before they are added, so that the chains wait for shared memory once per four adds
// instead of once per add (~30 cycles a wait: ~1,000 cycles on a hybrid group's path; eight at a
// time spilled in the per-head kernel); the per-head kernel's instance for steps that flush hybrid
// groups takes it (QaPlan::hybrid), every other kernel keeps the plain loop (in all of them, innerq
// at (64,32,8,8192) measured 0.2-0.4 us slower, whose steps flush no hybrid group every step:
// H100, twenty-third session, calls 9 and 10).
template <bool kBy4>
KVQ_WARP void SumsInOrder(const float* a, const float* b, int n, float* sa, float* sb) {
  float x = 0.f, y = 0.f;
  if (kBy4) {
    KVQ_NO_UNROLL
    for (int i = 0; i < n; i += 4) {
      float va[4], vb[4];
      KVQ_UNROLL
      for (int k = 0; k < 4; ++k) {
        va[k] = a[i + k];
        vb[k] = b[i + k];
      }
      KVQ_UNROLL
      for (int k = 0; k < 4; ++k) {
        x = AddRn(x, va[k]);
        y = AddRn(y, vb[k]);
      }
    }
  } else {
    KVQ_NO_UNROLL
    for (int i = 0; i < n; ++i) {
      x = AddRn(x, a[i]);
      y = AddRn(y, b[i]);
    }
  }
  *sa = x;
  *sb = y;
}

// One group of G = 32 * J values x (element j * 32 + lane in x[j]) quantized by the whole warp,
// bit-identical to QuantizeGroupRef (kvq/quant.h). err: this warp's 2 x G floats of shared memory.
// Returns false (same cases as the reference) on a non-finite input or an out-of-range scale/zero.
// kSumsBy4: SumsInOrder's loads four at a time.
template <int J, bool kSumsBy4 = false>
KVQ_WARP bool WarpQuantizeGroup(const float (&x)[J], int bits, QuantMode mode, float* err, int lane,
                                uint32_t (&code)[J], uint16_t* scale_bits, uint16_t* zero_bits) {
  constexpr int G = 32 * J;
  float mn = x[0], mx = x[0], amax = AbsF(x[0]);
  bool finite = true;
  KVQ_UNROLL
  for (int j = 0; j < J; ++j) {
    mn = MinF(mn, x[j]);
    mx = MaxF(mx, x[j]);
    amax = MaxF(amax, AbsF(x[j]));
    finite = finite && IsFiniteF(x[j]);
  }
  if (!warp::All(finite)) return false;
  KVQ_NO_UNROLL
  for (int off = 16; off > 0; off >>= 1) {
    mn = MinF(mn, warp::ShflXor(mn, off));
    mx = MaxF(mx, warp::ShflXor(mx, off));
    amax = MaxF(amax, warp::ShflXor(amax, off));
  }
  // The element the sequential loop keeps matters only for a zero: finite values that compare
  // equal have the same bits but for +0 and -0 (amax is an absolute value: no signed zero to pick).
  // Both tests are warp-uniform (every lane holds a zero of some sign, or the same value); the
  // shuffle-and-ballot chains are skipped on all other groups.
  if (mn == 0.f) mn = FirstEqual<J>(x, mn);
  if (mx == 0.f) mx = FirstEqual<J>(x, mx);
  const int qmax = AsymMaxCode(bits);
  const int L = SymLevels(bits);
  const bool hybrid = mode == QuantMode::kHybrid;
  const bool try_sym = mode == QuantMode::kSym || hybrid;
  const bool try_asym = mode == QuantMode::kAsym || hybrid;

  uint16_t ss16 = 0;
  bool sym_ok = false;
  float cs[J];
  if (try_sym) {
    ss16 = FloatToHalfBits(MaxF(DivRn(amax, float(L)), kMinScale));
    sym_ok = !HalfBitsIsInf(ss16);
    const float ss = HalfBitsToFloat(ss16);
    KVQ_UNROLL
    for (int j = 0; j < J; ++j) {
      cs[j] = MinF(MaxF(Rint(DivRn(x[j], ss)), float(-L)), float(L));
      if (hybrid) err[j * 32 + lane] = AbsF(SubRn(MulRn(cs[j], ss), x[j]));
    }
  }
  uint16_t sa16 = 0, z16 = 0;
  bool asym_ok = false;
  float ca[J];
  if (try_asym) {
    sa16 = FloatToHalfBits(MaxF(DivRn(SubRn(mx, mn), float(qmax)), kMinScale));
    z16 = FloatToHalfBits(mn);
    asym_ok = IsFiniteF(SubRn(mx, mn)) && !HalfBitsIsInf(sa16) && !HalfBitsIsInf(z16);
    const float sa = HalfBitsToFloat(sa16);
    const float z = HalfBitsToFloat(z16);
    KVQ_UNROLL
    for (int j = 0; j < J; ++j) {
      ca[j] = MinF(MaxF(Rint(DivRn(SubRn(x[j], z), sa)), 0.f), float(qmax));
      if (hybrid) err[G + j * 32 + lane] = AbsF(SubRn(AddRn(MulRn(ca[j], sa), z), x[j]));
    }
  }
  bool use_sym = mode == QuantMode::kSym;
  if (hybrid) {
    warp::Sync();
    // The reference sums a candidate's errors only when its scale is in range (the sums have no
    // side effect, so both are taken and the unused one dropped).
    float es, ea;
    SumsInOrder<kSumsBy4>(err, err + G, G, &es, &ea);
    if (!sym_ok) es = 0.f;
    if (!asym_ok) ea = 0.f;
    use_sym = sym_ok && (!asym_ok || es <= ea);
    warp::Sync();  // err is reused by the warp's next group
  }
  if (use_sym) {
    if (!sym_ok) return false;
    KVQ_UNROLL
    for (int j = 0; j < J; ++j) code[j] = static_cast<uint32_t>(static_cast<int>(cs[j]) + L);
    *scale_bits = ss16;
    *zero_bits = 0;
    return true;
  }
  if (!asym_ok) return false;
  KVQ_UNROLL
  for (int j = 0; j < J; ++j) code[j] = static_cast<uint32_t>(static_cast<int>(ca[j]));
  *scale_bits = hybrid ? static_cast<uint16_t>(sa16 | 0x8000u) : sa16;
  *zero_bits = z16;
  return true;
}

// PackCodes (kvq/quant.h) across the warp: word w of the group's bitstream is the OR of every
// lane's bits that land in it; lane w stores it (G * bits / 32 <= 32 words).
template <int J>
KVQ_WARP void WarpPackStore(const uint32_t (&code)[J], int bits, int lane, uint32_t* words) {
  const int nw = 32 * J * bits / 32;
  const uint32_t mask = (1u << bits) - 1u;
  for (int w = 0; w < nw; ++w) {
    uint32_t v = 0;
    KVQ_UNROLL
    for (int j = 0; j < J; ++j) {
      const int bit = (j * 32 + lane) * bits;
      const int lo = bit >> 5, sh = bit & 31;
      const uint32_t c = code[j] & mask;
      if (lo == w) v |= c << sh;
      if (sh + bits > 32 && lo + 1 == w) v |= c >> (32 - sh);
    }
    v = warp::ReduceOr(v);
    if (lane == w) words[w] = v;
  }
}

}  // namespace cuda
}  // namespace kvq
