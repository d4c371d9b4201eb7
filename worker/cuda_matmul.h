// The worker's CUDA compute path: weights dequantized once to fp16 and kept on the GPU, matrix
// products with cuBLAS (fp16 inputs, fp32 accumulation and output). The rest of the transformer
// stays on the CPU; activations cross per product (they are small next to the weights).
// Built only with CUDA; without a device Create answers an error, never aborts.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace kvq::worker {

class CudaMatMul {
 public:
  // "" on success, else why not (no device, no cuBLAS handle, ...).
  static std::string Create(std::unique_ptr<CudaMatMul>* out);
  ~CudaMatMul();
  CudaMatMul(const CudaMatMul&) = delete;
  CudaMatMul& operator=(const CudaMatMul&) = delete;

  // Uploads a weight [out, in] given as fp16 bits, row-major; returns its handle (>= 0) or -1
  // with *error set (out of device memory, ...).
  int Upload(const uint16_t* w_f16, int64_t out, int64_t in, std::string* error);
  // y[rows, out] = x[rows, in] * W^T; "" on success.
  std::string MatMul(int handle, const float* x, int64_t rows, float* y);
  int64_t device_bytes() const { return bytes_; }
  std::string device_name() const { return name_; }

 private:
  CudaMatMul() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t bytes_ = 0;
  std::string name_;
};

}  // namespace kvq::worker
