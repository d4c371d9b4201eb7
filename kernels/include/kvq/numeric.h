// Scalar helpers shared by host and device code: fp16/bf16 conversions with round-to-nearest-even
// and float arithmetic that is never contracted into FMA, so the CPU reference and the CUDA
// kernels compute bit-identical quantization codes.
#pragma once

#include <cstdint>

#include "kvq/format.h"

namespace kvq {

KVQ_HD float HalfBitsToFloat(uint16_t h);
KVQ_HD uint16_t FloatToHalfBits(float f);       // round-to-nearest-even, overflow -> inf
KVQ_HD float Bf16BitsToFloat(uint16_t b);
KVQ_HD uint16_t FloatToBf16Bits(float f);       // round-to-nearest-even, NaN preserved
KVQ_HD float LoadAct(const uint16_t* p, DType dtype);        // activation element to float
KVQ_HD uint16_t StoreAct(float f, DType dtype);              // float to activation bits

// Uncontracted arithmetic (nvcc contracts a*b+c into FMA by default; these never are).
KVQ_HD float AddRn(float a, float b);
KVQ_HD float SubRn(float a, float b);
KVQ_HD float MulRn(float a, float b);
KVQ_HD float DivRn(float a, float b);
KVQ_HD float Rint(float x);                                  // round half to even

}  // namespace kvq
