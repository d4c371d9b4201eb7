// Packed codes as bytes for integer products (dp4a, IMMA): a 32-code group bitstream (G = 32, 2-4
// bits, code i at bit i * bits) becomes 8 registers of 4 codes, one per byte, in a fixed "slot"
// order: slot k = 16 half + 4 t + e sits in byte e of register (half, t). Which physical code
// (channel of a key group, token of a value group) a slot holds is SlotPhys; the other operand
// of the product is laid out in slot order. 2 and 4 bits: one shift and one LOP3 per 4 codes;
// 3 bits: a funnel shift and five logic ops per 8 codes, the code at bit offset 0, 1 or 2 of its
// byte (SlotShift), so the other operand's byte carries the factor 2^-offset.
// The other operand is 16-bit fixed point as two signed bytes (FixedByte: v = 256 hi + lo), so
// hi-product * 256 + lo-product is the exact integer product with the 16-bit value.
#pragma once

#include <cstdint>

namespace kvq {
namespace cuda {

// Physical position (channel of a key group, token of a value group) of logical k slot `k` of the
// fragment, and the bit offset of its code inside the byte.
__host__ __device__ __forceinline__ int SlotPhys(int bits, int k) {
  const int t = (k & 15) >> 2, e = k & 3, half = k >> 4;
  if (bits == 2) return half * 16 + t + 4 * e;
  if (bits == 4) return half * 16 + 8 * (t >> 1) + (t & 1) + 2 * e;
  // 3 bits: slots of thread t come from codes 8t .. 8t+7: {0, 3, 6, 2} then {1, 4, 7, 5}
  const int j = half == 0 ? (e == 0 ? 0 : e == 1 ? 3 : e == 2 ? 6 : 2) : (e == 0 ? 1 : e == 1 ? 4 : e == 2 ? 7 : 5);
  return 8 * t + j;
}
__host__ __device__ __forceinline__ int SlotShift(int bits, int k) {
  return bits == 3 ? ((k & 3) == 3 ? 0 : (k & 3)) : 0;
}
// Inverse of SlotPhys: the slot of physical position p.
__host__ __device__ __forceinline__ int SlotOf(int bits, int p) {
  const int half = p >> 4, q = p & 15;
  if (bits == 2) return half * 16 + 4 * (q & 3) + (q >> 2);
  if (bits == 4) return half * 16 + 4 * (2 * (q >> 3) + (q & 1)) + ((q & 7) >> 1);
  const int t = p >> 3, j = p & 7;
  // j -> (half, e): 0 (0,0) 3 (0,1) 6 (0,2) 2 (0,3) 1 (1,0) 4 (1,1) 7 (1,2) 5 (1,3)
  const int h3 = (j == 1 || j == 4 || j == 7 || j == 5) ? 1 : 0;
  const int e3 = (j == 0 || j == 1) ? 0 : (j == 3 || j == 4) ? 1 : (j == 6 || j == 7) ? 2 : 3;
  return h3 * 16 + 4 * t + e3;
}

// The two registers (slots 4t .. 4t+3 and 16+4t .. 16+4t+3) of thread t (0..3) for one 32-code
// group bitstream `w` (registers, or shared memory for the IMMA fragments).
template <int BITS>
__device__ __forceinline__ void GroupSlots(const uint32_t* w, int t, uint32_t& r0, uint32_t& r1) {
  if constexpr (BITS == 2) {
    r0 = (w[0] >> (2 * t)) & 0x03030303u;
    r1 = (w[1] >> (2 * t)) & 0x03030303u;
  } else if constexpr (BITS == 4) {
    const int sh = 4 * (t & 1);
    r0 = (w[t >> 1] >> sh) & 0x0F0F0F0Fu;
    r1 = (w[2 + (t >> 1)] >> sh) & 0x0F0F0F0Fu;
  } else {
    static_assert(BITS == 3, "2, 3 or 4 bits");
    const int bit = 24 * t;
    const uint32_t lo = w[bit >> 5];
    const uint32_t hi = (bit >> 5) + 1 < 3 ? w[(bit >> 5) + 1] : lo;  // bits 24..31 of x are unused
    const uint32_t x = __funnelshift_r(lo, hi, bit & 31);
    r0 = (x & 0x001C0E07u) | ((x << 18) & 0x07000000u);
    r1 = ((x >> 3) & 0x001C0E07u) | ((x << 9) & 0x07000000u);
  }
}

// GroupSlots on a group staged in shared memory (8-byte aligned at 2 bits: its two words as one
// 8-byte read instead of two 4-byte ones; the IMMA tiles, decode_imma.cuh).
template <int BITS>
__device__ __forceinline__ void GroupSlotsShared(const uint32_t* w, int t, uint32_t& r0, uint32_t& r1) {
  if constexpr (BITS == 2) {
    const uint2 x = *reinterpret_cast<const uint2*>(w);
    r0 = (x.x >> (2 * t)) & 0x03030303u;
    r1 = (x.y >> (2 * t)) & 0x03030303u;
  } else {
    GroupSlots<BITS>(w, t, r0, r1);
  }
}

// 16-bit fixed point as (high, low) signed bytes: v = 256 hi + lo, lo in [-128, 127].
__device__ __forceinline__ uint32_t FixedByte(float x, bool low) {
  const int v = __float2int_rn(x);
  const int hi = (v + 128) >> 8;
  return static_cast<uint32_t>(low ? v - hi * 256 : hi) & 0xffu;
}

constexpr float kFixedScale = 32000.f;  // |v| <= 32000 < 32639, the largest (hi, lo) pair

// sum over the 32 slots of code byte x operand byte: r0[t] holds slots 4t .. 4t+3 (word t of o0),
// r1[t] slots 16+4t .. 16+4t+3 (word t of o1). Codes are < 128, so the signed form is exact.
__device__ __forceinline__ int Dp4a8(const uint32_t (&r0)[4], const uint32_t (&r1)[4], const uint4& o0,
                                     const uint4& o1) {
  int acc = __dp4a(static_cast<int>(r0[0]), static_cast<int>(o0.x), 0);
  acc = __dp4a(static_cast<int>(r0[1]), static_cast<int>(o0.y), acc);
  acc = __dp4a(static_cast<int>(r0[2]), static_cast<int>(o0.z), acc);
  acc = __dp4a(static_cast<int>(r0[3]), static_cast<int>(o0.w), acc);
  acc = __dp4a(static_cast<int>(r1[0]), static_cast<int>(o1.x), acc);
  acc = __dp4a(static_cast<int>(r1[1]), static_cast<int>(o1.y), acc);
  acc = __dp4a(static_cast<int>(r1[2]), static_cast<int>(o1.z), acc);
  return __dp4a(static_cast<int>(r1[3]), static_cast<int>(o1.w), acc);
}

}  // namespace cuda
}  // namespace kvq
