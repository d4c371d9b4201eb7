// The CPU reference: quantizers, packing, the quantize-append step and the attention, reading the
// stored layout directly (never a dequantized copy of the cache). It defines the format: the CUDA
// kernels must produce identical codes, scales and zeros for identical inputs.
#pragma once

#include <cstdint>

#include "kvq/cache.h"
#include "kvq/format.h"
#include "kvq/numeric.h"

namespace kvq {

// Quantizes one group of n values (n = G) with `bits` bits in `mode` (kAsym, kSym, kHybrid).
// Writes unsigned codes [n], the fp16 scale bits (negative = asym for hybrid) and the fp16 zero
// bits (0 for symmetric). Identical arithmetic on host and device (see numeric.h).
KVQ_HD void QuantizeGroupRef(const float* x, int n, int bits, QuantMode mode, uint8_t* codes,
                             uint16_t* scale_bits, uint16_t* zero_bits);
// Dequantized value of a code under a group's stored scale/zero.
KVQ_HD float DequantRef(uint32_t code, int bits, QuantMode mode, uint16_t scale_bits, uint16_t zero_bits);

// Bitstream packing of a group's codes: code i at bit i*bits; `words` has n*bits/32 entries.
KVQ_HD void PackCodes(const uint8_t* codes, int n, int bits, uint32_t* words);
KVQ_HD uint32_t UnpackCode(const uint32_t* words, int i, int bits);

// Runs a batched step (flush, append, attention; see SeqWork) on the CPU over `arena`.
// Uses up to `threads` threads (0 = hardware concurrency). Validates nothing the store already
// validated, but never reads or writes outside the pages it is given.
Result CpuRunStep(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                  int num_seqs, uint8_t* arena, int threads = 0);

// The two halves of CpuRunStep, for tests and for the CUDA comparison.
void CpuQuantizeAppend(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                       int num_seqs, uint8_t* arena, int threads = 0);
// Attention over the state after append (the SeqWork's post-step lengths).
void CpuAttention(const StepParams& params, const SeqWork* works, const QuantConfig* configs,
                  int num_seqs, const uint8_t* arena, int threads = 0);

}  // namespace kvq
