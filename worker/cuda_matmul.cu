#include "worker/cuda_matmul.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <mutex>
#include <vector>

namespace kvq::worker {
namespace {

// cuBLAS is opened at run time, not linked: every library a process starts with puts its
// thread-local storage into every thread's stack, and cuBLAS's (~106 KB with cublasLt) no longer
// fits the 100 KB stacks of the metrics server's threads (civetweb), whose start then failed in
// every CUDA build of kvq-worker ("null context when constructing CivetServer"). Opened later,
// its thread-local storage is allocated per thread when used. Only the four entry points below.
struct Cublas {
  using Create = cublasStatus_t (*)(cublasHandle_t*);
  using Destroy = cublasStatus_t (*)(cublasHandle_t);
  using SetStream = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
  using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                    const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                                    cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
  Create create = nullptr;
  Destroy destroy = nullptr;
  SetStream set_stream = nullptr;
  GemmEx gemm_ex = nullptr;
  std::string error;  // why it is not there ("" once loaded)
};

// The process's cuBLAS (KVQ_WORKER_CUBLAS_SONAME: the soname of the one this was built against,
// from worker/CMakeLists.txt), loaded once; never unloaded.
const Cublas& CublasApi() {
  static Cublas api;
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string name = KVQ_WORKER_CUBLAS_SONAME;
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = dlerror();
      api.error = "cannot load " + name + ": " + (e != nullptr ? e : "unknown error");
      return;
    }
    api.create = reinterpret_cast<Cublas::Create>(dlsym(lib, "cublasCreate_v2"));
    api.destroy = reinterpret_cast<Cublas::Destroy>(dlsym(lib, "cublasDestroy_v2"));
    api.set_stream = reinterpret_cast<Cublas::SetStream>(dlsym(lib, "cublasSetStream_v2"));
    api.gemm_ex = reinterpret_cast<Cublas::GemmEx>(dlsym(lib, "cublasGemmEx"));
    if (!api.create || !api.destroy || !api.set_stream || !api.gemm_ex) api.error = name + " lacks a cuBLAS entry point";
  });
  return api;
}

__global__ void FloatToHalfKernel(const float* x, __half* y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2half_rn(x[i]);
}

std::string CudaErr(const char* what, cudaError_t e) { return std::string(what) + ": " + cudaGetErrorString(e); }

}  // namespace

struct CudaMatMul::Impl {
  const Cublas* cublas = nullptr;  // the loaded cuBLAS, set before its handle is created
  cublasHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  struct W { __half* d = nullptr; int64_t out = 0, in = 0; };
  std::vector<W> weights;
  float* x32 = nullptr;      // device input staging [cap]
  __half* x16 = nullptr;     // device input fp16 [cap]
  float* y32 = nullptr;      // device output [cap_out]
  int64_t cap_in = 0, cap_out = 0;
  ~Impl() {
    for (auto& w : weights) cudaFree(w.d);
    cudaFree(x32);
    cudaFree(x16);
    cudaFree(y32);
    if (handle) cublas->destroy(handle);
    if (stream) cudaStreamDestroy(stream);
  }
  std::string Reserve(int64_t in_elems, int64_t out_elems) {
    if (in_elems > cap_in) {
      cudaFree(x32);
      cudaFree(x16);
      x32 = nullptr;
      x16 = nullptr;
      if (auto e = cudaMalloc(&x32, size_t(in_elems) * 4); e != cudaSuccess) return CudaErr("cudaMalloc", e);
      if (auto e = cudaMalloc(&x16, size_t(in_elems) * 2); e != cudaSuccess) return CudaErr("cudaMalloc", e);
      cap_in = in_elems;
    }
    if (out_elems > cap_out) {
      cudaFree(y32);
      y32 = nullptr;
      if (auto e = cudaMalloc(&y32, size_t(out_elems) * 4); e != cudaSuccess) return CudaErr("cudaMalloc", e);
      cap_out = out_elems;
    }
    return "";
  }
};

std::string CudaMatMul::Create(std::unique_ptr<CudaMatMul>* out) {
  int n = 0;
  if (auto e = cudaGetDeviceCount(&n); e != cudaSuccess || n == 0)
    return e != cudaSuccess ? CudaErr("no CUDA device", e) : "no CUDA device";
  std::unique_ptr<CudaMatMul> m(new CudaMatMul());
  m->impl_ = std::make_unique<Impl>();
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) m->name_ = prop.name;
  const Cublas& cublas = CublasApi();
  if (!cublas.error.empty()) return cublas.error;
  if (auto e = cudaStreamCreate(&m->impl_->stream); e != cudaSuccess) return CudaErr("cudaStreamCreate", e);
  m->impl_->cublas = &cublas;
  if (cublas.create(&m->impl_->handle) != CUBLAS_STATUS_SUCCESS) return "cublasCreate failed";
  cublas.set_stream(m->impl_->handle, m->impl_->stream);
  *out = std::move(m);
  return "";
}

CudaMatMul::~CudaMatMul() = default;

int CudaMatMul::Upload(const uint16_t* w_f16, int64_t out, int64_t in, std::string* error) {
  Impl::W w;
  w.out = out;
  w.in = in;
  const size_t bytes = size_t(out * in) * 2;
  if (auto e = cudaMalloc(&w.d, bytes); e != cudaSuccess) {
    *error = CudaErr("cudaMalloc for weights", e);
    return -1;
  }
  if (auto e = cudaMemcpy(w.d, w_f16, bytes, cudaMemcpyHostToDevice); e != cudaSuccess) {
    cudaFree(w.d);
    *error = CudaErr("cudaMemcpy weights", e);
    return -1;
  }
  bytes_ += int64_t(bytes);
  impl_->weights.push_back(w);
  return int(impl_->weights.size()) - 1;
}

std::string CudaMatMul::MatMul(int handle, const float* x, int64_t rows, float* y) {
  if (handle < 0 || handle >= int(impl_->weights.size())) return "bad weight handle";
  const Impl::W& w = impl_->weights[size_t(handle)];
  if (auto err = impl_->Reserve(rows * w.in, rows * w.out); !err.empty()) return err;
  cudaStream_t s = impl_->stream;
  if (auto e = cudaMemcpyAsync(impl_->x32, x, size_t(rows * w.in) * 4, cudaMemcpyHostToDevice, s); e != cudaSuccess)
    return CudaErr("cudaMemcpy x", e);
  const int64_t n = rows * w.in;
  FloatToHalfKernel<<<unsigned((n + 255) / 256), 256, 0, s>>>(impl_->x32, impl_->x16, n);
  if (auto e = cudaGetLastError(); e != cudaSuccess) return CudaErr("convert kernel", e);
  // Column-major view: Y^T [out, rows] = W [out, in] (stored row-major = W^T col-major) ^T * X^T.
  const float alpha = 1.f, beta = 0.f;
  const cublasStatus_t st = impl_->cublas->gemm_ex(impl_->handle, CUBLAS_OP_T, CUBLAS_OP_N, int(w.out), int(rows), int(w.in), &alpha,
                                         w.d, CUDA_R_16F, int(w.in), impl_->x16, CUDA_R_16F, int(w.in), &beta, impl_->y32,
                                         CUDA_R_32F, int(w.out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS) return "cublasGemmEx failed (status " + std::to_string(int(st)) + ")";
  if (auto e = cudaMemcpyAsync(y, impl_->y32, size_t(rows * w.out) * 4, cudaMemcpyDeviceToHost, s); e != cudaSuccess)
    return CudaErr("cudaMemcpy y", e);
  if (auto e = cudaStreamSynchronize(s); e != cudaSuccess) return CudaErr("cudaStreamSynchronize", e);
  return "";
}

}  // namespace kvq::worker
