// The CUDA device on the CPU, for CI machines without a GPU: the project's kernel sources
// (kernels/cuda/*.cu) compiled by the host compiler with -DKVQ_CUDA_EMU and this header forced in
// first (-include), linked against cuda_emu_runtime.cc instead of libcudart. A launch runs its
// blocks one after another; a block's threads are fibers (tests/kernels/warp_emu.h), warp
// instructions exchange their operands between the lanes of a warp:
//   - shuffles, ballots, __syncwarp, __syncthreads, atomics (blocks never run concurrently);
//   - mma.sync m16n8k16 (f16 / bf16 -> f32) and m16n8k32 (u8 x s8 -> s32) with the fragment layouts
//     of the PTX ISA, the products exact, the sums in fp32 / int32;
//   - ldmatrix .x4 (and .trans) from every lane's row address; movmatrix .m8n8 .trans;
//   - cp.async as deferred copies per thread: a copy lands only when a cp.async.wait_group covers
//     its group, so a tile read before its wait reads the slot's previous bytes, as it may on the GPU;
//     a global 32-byte sector that one warp's copies of a group send to two 32-byte units of shared
//     memory fails the launch (the GPU does not fault, but fetches the sector twice);
//   - __shared__ variables are static (one block at a time), dynamic shared memory is filled with
//     0xFF (NaN as fp16 / fp32) before every block, as device allocations are.
// What this cannot check: timing, races between blocks, memory ordering beyond program order,
// register or shared-memory limits; those need the GPU suite on a device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#include "warp_emu.h"

// Host meanings of the CUDA qualifiers (after the CUDA headers, which define them for nvcc).
#undef __device__
#undef __global__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __device__
#define __global__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)
#define __forceinline__ inline

namespace kvq_emu {

uint3 ThreadIdx();
uint3 BlockIdx();
dim3 BlockDim();
dim3 GridDim();
uint8_t* DynamicShared();

// Runs a grid: blocks in order, each block's threads as fibers; launches are serialized process-wide.
// pdl: launched as a programmatic dependent of the grid before it in the stream (the runtime's
// comment on PdlWindow: its blocks that do not call GridDependencyWait run before that grid's writes).
cudaError_t RunGrid(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream, const std::function<void()>& body,
                    bool pdl = false);
// griddepcontrol.launch_dependents / .wait (device_common.cuh): the first must come before the
// grid's first write, or be `late` (after the block's own wait: the dependent then sees memory as
// of the last block's call); the second block-uniformly.
void GridDependentsLaunch(bool late = false);
void GridDependencyWait();
// Launches so far that ran as programmatic dependents before their primary's writes (tests check
// that the model was on).
uint64_t PdlEarlyLaunches();
// Warp-wide fp16 / bf16 mma instructions run so far (MmaM16N8K16), all launches.
uint64_t FloatMmas();
// Fails the running launch with cudaErrorLaunchFailure and this message (a check in device code).
void LaunchError(const char* what);

// cp.async: n (0 or 16) bytes from src, the rest of 16 zero-filled, when a wait covers the group.
void CpAsync(void* dst, const void* src, int n);
void CpAsyncCommit();
void CpAsyncWait(int pending_groups);

// mbarrier and cp.async.bulk (.mbarrier::complete_tx::bytes) in the block's dynamic shared memory:
// a bulk copy's bytes are read from the source when it is issued and land only when a wait finds
// its barrier's phase complete (every arrival in, the copies' bytes equal to the expected ones),
// so a slot read before its wait reads the slot's previous bytes. A wait that could never complete
// (an arrival missing, expected bytes no copy brings), copies still in flight when the block ends,
// and operands the GPU faults on (addresses not 16-byte aligned, sizes not a multiple of 16, a
// destination outside the dynamic shared memory, a source outside one device allocation) fail the
// launch.
void MbarInit(uint64_t* bar, int count);
void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes);
// mbarrier.try_wait.parity: true once the phase of that parity has completed (the first try that
// finds every arrival in lands the phase's copies); a phase that stays incomplete for a million
// tries fails the launch (a hang on the GPU).
bool MbarTryWait(uint64_t* bar, uint32_t parity);
void BulkCopy(void* dst, const void* src, uint32_t bytes, uint64_t* bar);

void MmaM16N8K16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1,
                 bool bf16);
void ImmaM16N8K32(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);
void LdMatrixX4(uint32_t (&r)[4], const void* row_address, bool trans);
uint32_t MovMatrixTrans(uint32_t x);

template <typename T>
inline T BitsTo(uint32_t u) {
  static_assert(sizeof(T) == 4, "32-bit values");
  T v;
  std::memcpy(&v, &u, 4);
  return v;
}
template <typename T>
inline uint32_t ToBits(T v) {
  static_assert(sizeof(T) == 4, "32-bit values");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

}  // namespace kvq_emu

#define threadIdx (::kvq_emu::ThreadIdx())
#define blockIdx (::kvq_emu::BlockIdx())
#define blockDim (::kvq_emu::BlockDim())
#define gridDim (::kvq_emu::GridDim())

// ---- device intrinsics the kernels use ----
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
inline void __syncthreads() { kvq::cuda::warp::BlockSync(); }
inline void __syncwarp(unsigned = 0xffffffffu) { kvq::cuda::warp::Sync(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int off) {
  uint32_t all[32];
  kvq::cuda::warp::CurrentBlock()->Exchange(kvq_emu::ToBits(v), all);
  return kvq_emu::BitsTo<T>(all[(kvq::cuda::warp::CurrentBlock()->lane() ^ off) & 31]);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  if constexpr (sizeof(T) == 8) {  // 64-bit values as two exchanges, as the device does
    uint64_t u;
    std::memcpy(&u, &v, 8);
    const uint64_t lo = __shfl_sync(mask, static_cast<uint32_t>(u), src);
    const uint64_t hi = __shfl_sync(mask, static_cast<uint32_t>(u >> 32), src);
    u = lo | (hi << 32);
    T r;
    std::memcpy(&r, &u, 8);
    return r;
  } else {
    uint32_t all[32];
    kvq::cuda::warp::CurrentBlock()->Exchange(kvq_emu::ToBits(v), all);
    return kvq_emu::BitsTo<T>(all[src & 31]);
  }
}
inline int __any_sync(unsigned, int p) { return kvq::cuda::warp::Ballot(p != 0) != 0u ? 1 : 0; }
inline int __all_sync(unsigned, int p) { return kvq::cuda::warp::Ballot(p == 0) == 0u ? 1 : 0; }
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline int atomicExch(int* p, int v) {
  const int old = *p;
  *p = v;
  return old;
}
inline unsigned atomicExch(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = v;
  return old;
}
inline float __uint_as_float(uint32_t u) { return kvq_emu::BitsTo<float>(u); }
inline float __int_as_float(int i) { return kvq_emu::BitsTo<float>(static_cast<uint32_t>(i)); }
inline uint32_t __float_as_uint(float f) { return kvq_emu::ToBits(f); }
inline int __float_as_int(float f) { return static_cast<int>(kvq_emu::ToBits(f)); }
inline int __float2int_rn(float f) { return static_cast<int>(std::nearbyint(f)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline uint32_t __funnelshift_r(uint32_t lo, uint32_t hi, uint32_t shift) {
  return static_cast<uint32_t>(((uint64_t{hi} << 32) | lo) >> (shift & 31));
}
inline uint32_t __funnelshift_l(uint32_t lo, uint32_t hi, uint32_t shift) {
  return static_cast<uint32_t>((((uint64_t{hi} << 32) | lo) << (shift & 31)) >> 32);
}
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t v = (uint64_t{y} << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(uint32_t(a) >> (8 * i))) * int(int8_t(uint32_t(b) >> (8 * i)));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return c;
}
// a * b + c per half, rounded once (the fp16 products and sums are exact in double).
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  const float2 x = __half22float2(a), y = __half22float2(b), z = __half22float2(c);
  return __halves2half2(__double2half(double(x.x) * y.x + z.x), __double2half(double(x.y) * y.y + z.y));
}
// CUDA's global integer min / max
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
// The runtime's C++ overloads that cuda_runtime.h declares only for nvcc.
template <typename... P>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*entry)(P...)) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*entry)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  const float2 x = __bfloat1622float2(a), y = __bfloat1622float2(b), z = __bfloat1622float2(c);
  return __halves2bfloat162(__double2bfloat16(double(x.x) * y.x + z.x), __double2bfloat16(double(x.y) * y.y + z.y));
}
