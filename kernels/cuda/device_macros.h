// The function and loop annotations of the kernel bodies that also compile on the host
// (warp_quant.cuh, lane_quant.cuh, quantize_append.cuh: the CPU tests run that very code).
#pragma once

#if defined(__CUDACC__)
#define KVQ_WARP __device__ __forceinline__
#define KVQ_UNROLL _Pragma("unroll")
// Loops kept as loops: the quantize-append runs each of them once per group on an SM whose
// instruction cache is cold (its launch follows an attention kernel), so there code bytes cost
// more than the few instructions a loop adds (the phase trace, kvq-bench --qa-trace).
#define KVQ_NO_UNROLL _Pragma("unroll 1")
#define KVQ_UNROLL_4 _Pragma("unroll 4")
#else
#define KVQ_WARP inline
#define KVQ_UNROLL
#define KVQ_NO_UNROLL
#define KVQ_UNROLL_4
#endif
