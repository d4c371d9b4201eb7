// The CPU reference: quantizers, packing, the quantize-append step and the attention, reading the
// stored layout directly (never a dequantized copy of the cache). It defines the format: the CUDA
// kernels must produce identical codes, scales and zeros for identical inputs.
#pragma once

#include <cstdint>

#include "kvq/cache.h"
#include "kvq/format.h"
#include "kvq/numeric.h"
#include "kvq/quant.h"

namespace kvq {

// The quantizers, DequantRef, PackCodes / UnpackCode and KeyNormFactor are header-inline in
// kvq/quant.h (shared with the CUDA kernels).

// Runs a batched step (flush, append, attention; see SeqWork) on the CPU over `arena`.
// Uses up to `threads` threads (0 = hardware concurrency). Validates nothing the store already
// validated, but never reads or writes outside the pages it is given. Returns kInvalidArgument
// (before any attention output is written) when a flushed value is not finite or a group's scale
// or zero is beyond fp16 range; the caller then Aborts the plan.
Result CpuRunStep(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                  int num_seqs, uint8_t* arena, int threads = 0);

// The two halves of CpuRunStep, for tests and for the CUDA comparison. The quantize-append also
// takes flush-only batches (n_new = 0: the pending flush, nothing appended).
Result CpuQuantizeAppend(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                         int num_seqs, uint8_t* arena, int threads = 0);
// Attention over the state after append (the SeqWork's post-step lengths).
void CpuAttention(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                  int num_seqs, const uint8_t* arena, int threads = 0);

}  // namespace kvq
