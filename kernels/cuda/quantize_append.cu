// Quantize-append for a whole batch in one launch (plus, on a step that first quantizes keys
// with key normalization, one small launch before it for the factors).
//   1. flush: the oldest `flush` window tokens are quantized and packed into body tokens
//      [body_len, body_len + flush) (keys divided by the key-norm factors when key_norm), one warp
//      per group, lane = element: the warp computes exactly what the CPU reference's
//      QuantizeGroupRef computes (same per-element uncontracted arithmetic; min / max reductions
//      that keep the first element of the extreme value, as the sequential loop does, so even the
//      sign of a zero matches; the hybrid L1 errors summed in element order from shared memory),
//      so codes, scales and zeros are bit-identical;
//   2. append: the new tokens go to the sink first, then after the window's last token.
// Grid (sequence, KV head, K's chunks then V's, QaPlan): the chunks of a tensor split its groups
// between blocks (a 32-token along_tokens flush at D = 128 is 128 groups per head, 4 warps' worth
// one per lane), and chunk 0 also appends. Existing pages are never moved; the flushed window slots are left as they
// are (the planner frees emptied window pages).
#include "device_common.cuh"
#include "kvq/numeric.h"
#include "kvq/quant.h"
#include "quantize_append.cuh"

namespace kvq {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kQaThreads) KeyNormKernel(QaArgs a) {
  KeyNormBlock(a, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x);
}

// kWide: the same code as a function of its own whose preferred shared-memory carveout is the
// SM's largest (QaPlan::wide); the attribute is per function, the choice per launch.
template <bool kTrace, bool kLanes, bool kWide>
__global__ void __launch_bounds__(kQaThreads) QuantizeAppendKernel(QaArgs a) {
  GridDependentsLaunch();  // the attention may launch now; it waits for this grid to complete
  __shared__ float err[kQaWarps][QaWarpFloats(kLanes)];
  QuantizeAppendGridBlock<kTrace, kLanes>(a, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.z, threadIdx.x,
                                          err[threadIdx.x >> 5]);
  if (a.wait_at_end) GridDependencyWait();  // a flush beside the attention before it (QaArgs::wait_at_end)
}

// The whole step's quantize-append, one block per (sequence, KV head) (QaPlan::head). kSumsBy4: the
// instance for steps that flush hybrid groups (QaPlan::hybrid: the errors' sums four loads at a
// time); the other keeps main's code, which measured faster for the presets without hybrid
// flushes (H100, twenty-third session, calls 9 and 10).
template <bool kTrace, bool kWide, bool kSumsBy4>
__global__ void __launch_bounds__(kQaHeadWarps * 32) QuantizeAppendHeadKernel(QaHeadArgs a) {
  GridDependentsLaunch();  // the attention may launch now; it waits for this grid to complete
  __shared__ float err[kQaHeadWarps][2 * kMaxGroupSize];
  QuantizeAppendHeadBlock<kTrace, kSumsBy4>(a.qa, a.heads, blockIdx.x, blockIdx.y, threadIdx.x, err[threadIdx.x >> 5],
                                            static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y);
  if (a.qa.wait_at_end) GridDependencyWait();  // a flush beside the attention before it (QaArgs::wait_at_end)
}

// The quantize-append kernels of one carveout choice (kWide), the key-norm kernel with the plain ones.
template <bool kWide>
cudaError_t SetCarveout(int percent) {
  cudaError_t e = kWide ? cudaSuccess
                        : cudaFuncSetAttribute(KeyNormKernel, cudaFuncAttributePreferredSharedMemoryCarveout, percent);
  for (const void* f : {reinterpret_cast<const void*>(QuantizeAppendKernel<false, false, kWide>),
                        reinterpret_cast<const void*>(QuantizeAppendKernel<true, false, kWide>),
                        reinterpret_cast<const void*>(QuantizeAppendKernel<false, true, kWide>),
                        reinterpret_cast<const void*>(QuantizeAppendKernel<true, true, kWide>),
                        reinterpret_cast<const void*>(QuantizeAppendHeadKernel<false, kWide, false>),
                        reinterpret_cast<const void*>(QuantizeAppendHeadKernel<true, kWide, false>),
                        reinterpret_cast<const void*>(QuantizeAppendHeadKernel<false, kWide, true>),
                        reinterpret_cast<const void*>(QuantizeAppendHeadKernel<true, kWide, true>)})
    if (e == cudaSuccess) e = cudaFuncSetAttribute(f, cudaFuncAttributePreferredSharedMemoryCarveout, percent);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}

// Whether the wide instances' carveout is set on the current device (once per device; a failure
// is not remembered, the next wide launch tries again).
bool WideCarveoutSet() {
  static OccupancyMemo done;  // per device: key 0 present once set
  int dev = 0, unused = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (done.Find(dev, 0, &unused)) return true;
  if (SetCarveout<true>(cudaSharedmemCarveoutMaxShared) != cudaSuccess) return false;  // error cleared there
  done.Put(dev, 0, 1);
  return true;
}

}  // namespace

cudaError_t SetQuantizeAppendCarveout(int percent) { return SetCarveout<false>(percent); }

int QuantizeAppendBlocksPerSm() {
  static OccupancyMemo memo;  // per device
  return BlocksPerSmNoSmem(&memo, QuantizeAppendKernel<false, false, false>, kQaThreads);
}

namespace {

template <bool kWide>
cudaError_t LaunchQuantizeAppendAs(const QaArgs& a, int num_seqs, const QaPlan& plan, const DevQaHead* heads,
                                   cudaStream_t stream) {
  const bool pdl = a.wait_at_end != 0;
  if (plan.head) {  // the plan never asks for it with key-norm factors to compute
    if (!heads) return cudaErrorInvalidValue;
    const dim3 grid(num_seqs, a.num_kv_heads);
    const QaHeadArgs h{a, heads};
    const dim3 block(kQaHeadWarps * 32);
    if (plan.hybrid)
      return a.trace ? LaunchKernel(QuantizeAppendHeadKernel<true, kWide, true>, grid, block, 0, stream, h, pdl)
                     : LaunchKernel(QuantizeAppendHeadKernel<false, kWide, true>, grid, block, 0, stream, h, pdl);
    return a.trace ? LaunchKernel(QuantizeAppendHeadKernel<true, kWide, false>, grid, block, 0, stream, h, pdl)
                   : LaunchKernel(QuantizeAppendHeadKernel<false, kWide, false>, grid, block, 0, stream, h, pdl);
  }
  const dim3 grid = QaGrid(num_seqs, a.num_kv_heads, plan.k_chunks, plan.v_chunks);
  const dim3 block(kQaThreads);
  if (plan.lanes)
    return a.trace ? LaunchKernel(QuantizeAppendKernel<true, true, kWide>, grid, block, 0, stream, a, pdl)
                   : LaunchKernel(QuantizeAppendKernel<false, true, kWide>, grid, block, 0, stream, a, pdl);
  return a.trace ? LaunchKernel(QuantizeAppendKernel<true, false, kWide>, grid, block, 0, stream, a, pdl)
                 : LaunchKernel(QuantizeAppendKernel<false, false, kWide>, grid, block, 0, stream, a, pdl);
}

}  // namespace

cudaError_t LaunchQuantizeAppend(const QaArgs& args, int num_seqs, const QaPlan& plan, const DevQaHead* heads,
                                 cudaStream_t stream) {
  if (num_seqs <= 0) return cudaSuccess;
  // A dependent (wait_at_end) launches as one only when it is the first kernel after its primary:
  // with the key-norm launch first, both run plainly after it.
  QaArgs a = args;
  a.k_chunks = plan.k_chunks;
  if (plan.key_norm) {
    a.wait_at_end = 0;
    const cudaError_t e =
        LaunchKernel(KeyNormKernel, dim3(num_seqs, a.num_kv_heads), dim3(kQaThreads), 0, stream, a, false);
    if (e != cudaSuccess) return e;
  }
  // The carveout is a preference: where it cannot be set, the plain instances run the step.
  return plan.wide && WideCarveoutSet() ? LaunchQuantizeAppendAs<true>(a, num_seqs, plan, heads, stream)
                                        : LaunchQuantizeAppendAs<false>(a, num_seqs, plan, heads, stream);
}

}  // namespace cuda
}  // namespace kvq
