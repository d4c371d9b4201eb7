#include "worker/model.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "worker/status.h"

#if KVQ_WORKER_HAVE_CUDA
#include "worker/cuda_matmul.h"
#include "worker/half.h"
#endif
#if KVQ_WORKER_HAVE_BLAS
#include <cblas.h>
#include <dlfcn.h>
#endif
#include <strings.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace kvq::worker {

#if KVQ_WORKER_HAVE_BLAS
namespace {

// The BLAS library is opened at run time, not linked: every library a process starts with puts its
// thread-local storage into every thread's stack, and OpenBLAS's (60 KB, with the CUDA runtime's
// beside it) left the 100 KB stacks of the metrics server's threads (civetweb) too little: the
// /metrics page came back empty (cuBLAS, linked too, made the server fail to start at all:
// cuda_matmul.cu). Opened later, its thread-local storage is allocated per thread when used.
struct BlasApi {
  decltype(&cblas_sgemm) sgemm = nullptr;
  void (*set_num_threads)(int) = nullptr;  // OpenBLAS only
  char* (*get_corename)() = nullptr;       // OpenBLAS only
};

// The library this was built against (its soname, KVQ_WORKER_BLAS_SONAME), loaded once, never
// unloaded; without it the products take the packed dot products (MatMul).
const BlasApi& Blas() {
  static const BlasApi api = [] {
    BlasApi a;
    void* lib = dlopen(KVQ_WORKER_BLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = dlerror();
      std::fprintf(stderr, "kvq-worker: no BLAS (%s): many-row products without it\n", e != nullptr ? e : "");
      return a;
    }
    a.sgemm = reinterpret_cast<decltype(a.sgemm)>(dlsym(lib, "cblas_sgemm"));
    a.set_num_threads = reinterpret_cast<decltype(a.set_num_threads)>(dlsym(lib, "openblas_set_num_threads"));
    a.get_corename = reinterpret_cast<decltype(a.get_corename)>(dlsym(lib, "openblas_get_corename"));
    return a;
  }();
  return api;
}

}  // namespace
#endif

std::string BlasCoreTypeOverride() {
#if KVQ_WORKER_HAVE_BLAS && defined(__x86_64__) && defined(__GNUC__)
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr || Blas().get_corename == nullptr) return "";
  const char* name = Blas().get_corename();
  if (name == nullptr) return "";
  // the generic x86-64 cores OpenBLAS falls back to, below the AVX2 ones
  static const char* const kGeneric[] = {"prescott", "core2", "penryn", "dunnington", "nehalem", "katmai",
                                         "coppermine", "northwood", "unknown"};
  bool generic = false;
  for (const char* g : kGeneric) generic = generic || strcasecmp(name, g) == 0;
  if (!generic) return "";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
  return "";
}

// A fixed set of threads running ParallelFor over index ranges; the caller takes part. A decode step
// runs ~7 short products per layer back to back: a thread that finished its part (or the caller,
// waiting for the others) spins for up to kSpin before it sleeps, since waking a sleeping thread
// costs tens of microseconds on a virtual machine (its idle core halts), about as much as a part.
class ThreadPool {
 public:
  static constexpr std::chrono::microseconds kSpin{50};

  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return int(workers_.size()) + 1; }
  // fn(begin, end) over [0, n) split into size() parts. One ParallelFor at a time per pool.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    const int parts = size();
    if (parts == 1 || n < 2) {
      fn(0, n);
      return;
    }
    std::lock_guard<std::mutex> one(run_mu_);
    {
      std::lock_guard<std::mutex> l(mu_);
      fn_ = &fn;
      n_ = n;
      parts_ = parts;
      next_part_ = 1;
      pending_ = parts - 1;
      ++gen_;
    }
    cv_.notify_all();
    fn(0, n / parts);
    SpinUntil([&] { return pending_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> l(mu_);
    done_cv_.wait(l, [&] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  // Polls ready() for up to kSpin (a hint only: the caller then takes the lock and waits properly).
  template <typename Ready>
  static void SpinUntil(Ready&& ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
      if (ready()) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return;
    }
  }

  void Loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      if (!(stop_ || (gen_ != seen && next_part_ < parts_))) {
        l.unlock();
        SpinUntil([&] { return stop_.load(std::memory_order_acquire) || gen_.load(std::memory_order_acquire) != seen; });
        l.lock();
      }
      cv_.wait(l, [&] { return stop_ || (gen_ != seen && next_part_ < parts_); });
      if (stop_) return;
      const int part = next_part_++;
      if (next_part_ >= parts_) seen = gen_;
      const auto* fn = fn_;
      const int64_t n = n_;
      const int parts = parts_;
      l.unlock();
      (*fn)(n * part / parts, n * (part + 1) / parts);
      l.lock();
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 0, next_part_ = 0;
  // written under mu_; read without it only by SpinUntil's hints
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> gen_{0};
  std::atomic<bool> stop_{false};
};

namespace {

// Dot product with 8 independent accumulators (vectorizes without -ffast-math).
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

absl::Status CheckTensor(const GgufFile& f, const std::string& name, std::vector<int64_t> dims, const GgufTensor** out,
                         bool optional = false) {
  const GgufTensor* t = f.tensor(name);
  if (t == nullptr) {
    if (optional) {
      *out = nullptr;
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat("model has no tensor ", name));
  }
  if (t->dims != dims) {
    std::string want, got;
    for (auto d : dims) absl::StrAppend(&want, want.empty() ? "" : "x", d);
    for (auto d : t->dims) absl::StrAppend(&got, got.empty() ? "" : "x", d);
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has shape ", got, ", expected ", want));
  }
  *out = t;
  return absl::OkStatus();
}

}  // namespace

#if !KVQ_WORKER_HAVE_CUDA
class CudaMatMul {};
#endif

Model::~Model() = default;

std::string Model::compute_device() const {
#if KVQ_WORKER_HAVE_CUDA
  if (gpu_ != nullptr) return "cuda (" + gpu_->device_name() + ")";
#endif
  return "cpu";
}

absl::Status Model::UseCuda() {
#if KVQ_WORKER_HAVE_CUDA
  std::unique_ptr<CudaMatMul> g;
  const std::string err = CudaMatMul::Create(&g);
  if (!err.empty()) return absl::FailedPreconditionError("CUDA backend: " + err);
  std::vector<const GgufTensor*> ws;
  for (const Layer& L : layers_) {
    for (const GgufTensor* t : {L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down}) ws.push_back(t);
  }
  ws.push_back(output_);
  for (const GgufTensor* t : ws) {
    if (gpu_handle_.count(t)) continue;
    const int64_t in = t->dims[0], out = t->rows(), rb = GgmlRowBytes(t->type, in);
    std::vector<uint16_t> h(static_cast<size_t>(in * out));
    std::vector<float> row(static_cast<size_t>(in));
    for (int64_t o = 0; o < out; ++o) {
      DequantizeRow(t->type, t->data + o * rb, row.data(), in);
      for (int64_t i = 0; i < in; ++i) h[size_t(o * in + i)] = FloatToHalf(row[size_t(i)]);
    }
    std::string uerr;
    const int handle = g->Upload(h.data(), out, in, &uerr);
    if (handle < 0) return absl::ResourceExhaustedError("CUDA backend: " + uerr);
    gpu_handle_[t] = handle;
  }
  gpu_ = std::move(g);
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError("this build has no CUDA (configure with -DKVQ_CUDA=ON on a machine with nvcc)");
#endif
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path, bool progress, int threads) {
  KVQ_ASSIGN_OR_RETURN(auto file, GgufFile::Open(path, progress));
  return FromFile(std::move(file), threads);
}

absl::StatusOr<std::unique_ptr<Model>> Model::FromFile(std::unique_ptr<GgufFile> file, int threads) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = std::move(file);
  KVQ_RETURN_IF_ERROR(m->Init(threads));
  return m;
}

absl::Status Model::Init(int threads) {
  const GgufFile& f = *file_;
  KVQ_ASSIGN_OR_RETURN(cfg_.arch, f.GetString("general.architecture"));
  static const char* kArchs[] = {"llama", "mistral", "qwen2", "qwen3"};
  if (std::find(std::begin(kArchs), std::end(kArchs), cfg_.arch) == std::end(kArchs))
    return absl::UnimplementedError(absl::StrCat("model architecture '", cfg_.arch, "' is not supported (llama, mistral, qwen2)"));
  cfg_.name = f.GetString("general.name").value_or("");
  const std::string a = cfg_.arch + ".";
  auto get_int = [&](const std::string& key, int* out) -> absl::Status {
    KVQ_ASSIGN_OR_RETURN(double v, f.GetNumber(a + key));
    if (v < 1 || v > 1e9) return absl::InvalidArgumentError(absl::StrCat("GGUF metadata ", a, key, " = ", v, " is out of range"));
    *out = int(v);
    return absl::OkStatus();
  };
  KVQ_RETURN_IF_ERROR(get_int("block_count", &cfg_.num_layers));
  KVQ_RETURN_IF_ERROR(get_int("embedding_length", &cfg_.d_model));
  KVQ_RETURN_IF_ERROR(get_int("attention.head_count", &cfg_.num_heads));
  KVQ_RETURN_IF_ERROR(get_int("feed_forward_length", &cfg_.d_ff));
  cfg_.num_kv_heads = int(f.NumberOr(a + "attention.head_count_kv", cfg_.num_heads));
  cfg_.context_length = int(f.NumberOr(a + "context_length", 2048));
  cfg_.head_dim = int(f.NumberOr(a + "attention.key_length", cfg_.d_model / cfg_.num_heads));
  cfg_.rope_theta = float(f.NumberOr(a + "rope.freq_base", 10000.0));
  cfg_.norm_eps = float(f.NumberOr(a + "attention.layer_norm_rms_epsilon", 1e-5));
  cfg_.rope_neox = cfg_.arch == "qwen2" || cfg_.arch == "qwen3";
  if (auto st = f.GetString(a + "rope.scaling.type"); st.ok() && *st == "linear")
    cfg_.rope_linear_scale = float(f.NumberOr(a + "rope.scaling.factor", 1.0));
  if (cfg_.num_kv_heads < 1 || cfg_.num_heads % cfg_.num_kv_heads != 0)
    return absl::InvalidArgumentError(absl::StrCat("head_count ", cfg_.num_heads, " is not a multiple of head_count_kv ", cfg_.num_kv_heads));
  if (cfg_.head_dim < 2 || cfg_.head_dim % 2 != 0) return absl::InvalidArgumentError("head dimension must be even");
  if (int rd = int(f.NumberOr(a + "rope.dimension_count", cfg_.head_dim)); rd != cfg_.head_dim)
    return absl::UnimplementedError(absl::StrCat("partial RoPE (", rd, " of ", cfg_.head_dim, " dims) is not supported"));

  const int64_t D = cfg_.d_model, qd = int64_t(cfg_.num_heads) * cfg_.head_dim, kvd = int64_t(cfg_.num_kv_heads) * cfg_.head_dim;
  tok_embd_ = f.tensor("token_embd.weight");
  if (tok_embd_ == nullptr || tok_embd_->dims.size() != 2 || tok_embd_->dims[0] != D)
    return absl::InvalidArgumentError("model has no token_embd.weight of width embedding_length");
  cfg_.vocab_size = int(tok_embd_->dims[1]);
  KVQ_RETURN_IF_ERROR(CheckTensor(f, "output_norm.weight", {D}, &out_norm_));
  KVQ_RETURN_IF_ERROR(CheckTensor(f, "output.weight", {D, cfg_.vocab_size}, &output_, /*optional=*/true));
  cfg_.tied_embeddings = output_ == nullptr;
  if (output_ == nullptr) output_ = tok_embd_;
  layers_.resize(size_t(cfg_.num_layers));
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    Layer& L = layers_[size_t(l)];
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_norm.weight", {D}, &L.attn_norm));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_q.weight", {D, qd}, &L.wq));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_k.weight", {D, kvd}, &L.wk));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_v.weight", {D, kvd}, &L.wv));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_output.weight", {qd, D}, &L.wo));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "ffn_norm.weight", {D}, &L.ffn_norm));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "ffn_gate.weight", {D, cfg_.d_ff}, &L.w_gate));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "ffn_up.weight", {D, cfg_.d_ff}, &L.w_up));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "ffn_down.weight", {int64_t(cfg_.d_ff), D}, &L.w_down));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_q.bias", {qd}, &L.bq, true));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_k.bias", {kvd}, &L.bk, true));
    KVQ_RETURN_IF_ERROR(CheckTensor(f, p + "attn_v.bias", {kvd}, &L.bv, true));
  }
  // RoPE inverse frequencies, as transformers computes them (float32).
  const int half = cfg_.head_dim / 2;
  inv_freq_.resize(size_t(half));
  for (int i = 0; i < half; ++i)
    inv_freq_[size_t(i)] = 1.0f / std::pow(cfg_.rope_theta, float(2 * i) / float(cfg_.head_dim));
  if (const GgufTensor* ff = f.tensor("rope_freqs.weight")) {  // Llama 3.1 style frequency factors
    if (ff->type != GgmlType::kF32 || ff->elements() != half) return absl::InvalidArgumentError("rope_freqs.weight has the wrong shape");
    std::vector<float> fac(static_cast<size_t>(half));
    DequantizeRow(GgmlType::kF32, ff->data, fac.data(), half);
    for (int i = 0; i < half; ++i) inv_freq_[size_t(i)] /= fac[size_t(i)];
  }
  if (f.Find("tokenizer.ggml.model") != nullptr) {
    auto tok = Tokenizer::FromGguf(f);
    if (tok.ok()) {
      tokenizer_ = std::make_unique<Tokenizer>(std::move(*tok));
    } else if (!absl::IsUnimplemented(tok.status())) {
      return tok.status();
    }  // an unsupported tokenizer kind: the model still serves token ids
  }
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  pool_ = std::make_unique<ThreadPool>(threads);
#if KVQ_WORKER_HAVE_BLAS
  if (Blas().set_num_threads != nullptr) Blas().set_num_threads(1);  // our pool parallelizes
#endif
  return absl::OkStatus();
}

void Model::MatMul(const GgufTensor& w, const float* x, int64_t rows, float* y) const {
  const int64_t in = w.dims[0], out = w.rows();
  const int64_t row_bytes = GgmlRowBytes(w.type, in);
#if KVQ_WORKER_HAVE_CUDA
  if (gpu_ != nullptr) {
    auto it = gpu_handle_.find(&w);
    if (it != gpu_handle_.end()) {
      const std::string err = gpu_->MatMul(it->second, x, rows, y);
      if (err.empty()) return;
      if (gpu_error_.empty()) gpu_error_ = err;
      std::fill(y, y + rows * out, 0.f);
      return;
    }
  }
#endif
#if KVQ_WORKER_HAVE_BLAS
  if (rows >= kBlasMinRows && Blas().sgemm != nullptr) {
    // Many rows (prefill): dequantize blocks of weight rows and multiply with sgemm.
    constexpr int64_t kBlock = 64;
    const int64_t blocks = (out + kBlock - 1) / kBlock;
    pool_->ParallelFor(blocks, [&](int64_t begin, int64_t end) {
      std::vector<float> wb(static_cast<size_t>(kBlock * in));
      for (int64_t b = begin; b < end; ++b) {
        const int64_t o0 = b * kBlock, n = std::min(kBlock, out - o0);
        for (int64_t o = 0; o < n; ++o) DequantizeRow(w.type, w.data + (o0 + o) * row_bytes, wb.data() + o * in, in);
        Blas().sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(n), int(in), 1.0f, x, int(in), wb.data(),
                    int(in), 0.0f, y + o0, int(out));
      }
    });
    return;
  }
#endif
  // Few rows (decode): the block types' dot products on the packed rows (DotRow, with the 32-element
  // block sums of x computed once here); the others through a dequantized copy of each row.
  const bool packed = HasDotRow(w.type) && in % 32 == 0;
  std::vector<float> xsum;
  if (packed) {
    xsum.resize(static_cast<size_t>(rows * (in / 32)));
    for (int64_t r = 0; r < rows; ++r) BlockSums32(x + r * in, in, xsum.data() + r * (in / 32));
  }
  pool_->ParallelFor(out, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(packed ? 0 : static_cast<size_t>(in));
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* wr = w.data + o * row_bytes;
      if (packed) {
        for (int64_t r = 0; r < rows; ++r) DotRow(w.type, wr, x + r * in, xsum.data() + r * (in / 32), in, &y[r * out + o]);
        continue;
      }
      DequantizeRow(w.type, wr, tmp.data(), in);
      for (int64_t r = 0; r < rows; ++r) y[r * out + o] = Dot(tmp.data(), x + r * in, in);
    }
  });
}

void Model::RmsNorm(const float* x, const GgufTensor& w, int64_t rows, float* y) const {
  const int64_t n = w.dims[0];
  std::vector<float> g(static_cast<size_t>(n));
  DequantizeRow(w.type, w.data, g.data(), n);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(n) + cfg_.norm_eps);
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = g[size_t(i)] * (xr[i] * inv);
  }
}

void Model::Rope(float* x, int64_t rows, int heads, const std::vector<int32_t>& positions) const {
  const int Dh = cfg_.head_dim, half = Dh / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float pos = float(positions[size_t(r)]) / cfg_.rope_linear_scale;
    for (int i = 0; i < half; ++i) {
      const float ang = pos * inv_freq_[size_t(i)];
      const float c = std::cos(ang), s = std::sin(ang);
      for (int h = 0; h < heads; ++h) {
        float* v = x + (r * heads + h) * Dh;
        // Llama GGUF files store q/k rows permuted for adjacent-pair rotation; NeoX rotates halves.
        const int a = cfg_.rope_neox ? i : 2 * i, b = cfg_.rope_neox ? i + half : 2 * i + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x1 * c + x0 * s;
      }
    }
  }
}

absl::Status Model::Forward(const std::vector<SeqChunk>& chunks, AttentionBackend* attention, std::vector<float>* logits) {
  const int64_t D = cfg_.d_model, Dh = cfg_.head_dim;
  const int64_t qd = int64_t(cfg_.num_heads) * Dh, kvd = int64_t(cfg_.num_kv_heads) * Dh, F = cfg_.d_ff;
  int64_t R = 0;
  std::vector<AttendSeq> seqs;
  std::vector<int32_t> positions;
  for (const auto& c : chunks) {
    if (c.tokens.empty()) return absl::InvalidArgumentError("a sequence in the batch has no tokens");
    if (c.position < 0) return absl::InvalidArgumentError("negative position");
    seqs.push_back({c.session, c.position, int32_t(c.tokens.size())});
    for (size_t j = 0; j < c.tokens.size(); ++j) {
      if (c.tokens[j] < 0 || c.tokens[j] >= cfg_.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("token id ", c.tokens[j], " is outside the vocabulary (", cfg_.vocab_size, ")"));
      positions.push_back(c.position + int32_t(j));
    }
    R += int64_t(c.tokens.size());
  }
  if (R == 0) return absl::InvalidArgumentError("empty batch");
  std::vector<float> x(size_t(R * D)), h(size_t(R * D)), q(size_t(R * qd)), k(size_t(R * kvd)), v(size_t(R * kvd)), o;
  std::vector<float> ao(static_cast<size_t>(R * D)), g(size_t(R * F)), u(size_t(R * F));
  {
    const int64_t rb = GgmlRowBytes(tok_embd_->type, D);
    int64_t r = 0;
    for (const auto& c : chunks)
      for (int32_t t : c.tokens) DequantizeRow(tok_embd_->type, tok_embd_->data + int64_t(t) * rb, x.data() + (r++) * D, D);
  }
  auto add_bias = [&](const GgufTensor* b, std::vector<float>& m, int64_t width) {
    if (b == nullptr) return;
    std::vector<float> bb(static_cast<size_t>(width));
    DequantizeRow(b->type, b->data, bb.data(), width);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < width; ++i) m[size_t(r * width + i)] += bb[size_t(i)];
  };
  KVQ_RETURN_IF_ERROR(attention->BeginStep());
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const Layer& L = layers_[size_t(l)];
    RmsNorm(x.data(), *L.attn_norm, R, h.data());
    MatMul(*L.wq, h.data(), R, q.data());
    MatMul(*L.wk, h.data(), R, k.data());
    MatMul(*L.wv, h.data(), R, v.data());
    add_bias(L.bq, q, qd);
    add_bias(L.bk, k, kvd);
    add_bias(L.bv, v, kvd);
    Rope(q.data(), R, cfg_.num_heads, positions);
    Rope(k.data(), R, cfg_.num_kv_heads, positions);
    absl::Status st = attention->Attend(l, seqs, q, k, v, &o);
    if (!st.ok()) {
      (void)attention->EndStep();
      return st;
    }
    if (int64_t(o.size()) != R * qd) {
      (void)attention->EndStep();
      return absl::InternalError("attention returned the wrong number of rows");
    }
    MatMul(*L.wo, o.data(), R, ao.data());
    for (int64_t i = 0; i < R * D; ++i) x[size_t(i)] += ao[size_t(i)];
    RmsNorm(x.data(), *L.ffn_norm, R, h.data());
    MatMul(*L.w_gate, h.data(), R, g.data());
    MatMul(*L.w_up, h.data(), R, u.data());
    for (int64_t i = 0; i < R * F; ++i) {
      const float gi = g[size_t(i)];
      g[size_t(i)] = gi / (1.0f + std::exp(-gi)) * u[size_t(i)];
    }
    MatMul(*L.w_down, g.data(), R, ao.data());
    for (int64_t i = 0; i < R * D; ++i) x[size_t(i)] += ao[size_t(i)];
  }
  KVQ_RETURN_IF_ERROR(attention->EndStep());
  if (!gpu_error_.empty()) {
    const std::string err = gpu_error_;
    gpu_error_.clear();
    return absl::InternalError("CUDA matrix product failed: " + err);
  }
  // Final norm and logits for the last row of each chunk that wants them.
  std::vector<float> last;
  int64_t r = 0;
  for (const auto& c : chunks) {
    r += int64_t(c.tokens.size());
    if (c.want_logits) last.insert(last.end(), x.begin() + (r - 1) * D, x.begin() + r * D);
  }
  const int64_t nl = int64_t(last.size()) / D;
  logits->assign(size_t(nl * cfg_.vocab_size), 0.f);
  if (nl == 0) return absl::OkStatus();
  std::vector<float> hn(last.size());
  RmsNorm(last.data(), *out_norm_, nl, hn.data());
  MatMul(*output_, hn.data(), nl, logits->data());
  if (!gpu_error_.empty()) {
    const std::string err = gpu_error_;
    gpu_error_.clear();
    return absl::InternalError("CUDA matrix product failed: " + err);
  }
  return absl::OkStatus();
}

// ---- ExactAttention ----

absl::StatusOr<std::string> ExactAttention::CreateSession(const SessionShape& shape, const std::string& preset) {
  if (shape.num_layers < 1 || shape.num_kv_heads < 1 || shape.num_q_heads % shape.num_kv_heads != 0 || shape.head_dim < 1)
    return absl::InvalidArgumentError("bad session shape");
  const std::string id = absl::StrCat("exact-", next_id_++);
  Session s;
  s.shape = shape;
  s.k.resize(size_t(shape.num_layers));
  s.v.resize(size_t(shape.num_layers));
  sessions_.emplace(id, std::move(s));
  return id;
}

absl::Status ExactAttention::DeleteSession(const std::string& session) {
  if (sessions_.erase(session) == 0) return absl::NotFoundError(absl::StrCat("no session ", session));
  return absl::OkStatus();
}

absl::StatusOr<int32_t> ExactAttention::SessionLength(const std::string& session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("no session ", session));
  const auto& sh = it->second.shape;
  size_t len = SIZE_MAX;
  for (const auto& k : it->second.k) len = std::min(len, k.size() / size_t(sh.num_kv_heads * sh.head_dim));
  return int32_t(len);
}

absl::Status ExactAttention::Attend(int layer, const std::vector<AttendSeq>& seqs, const std::vector<float>& q,
                                    const std::vector<float>& k, const std::vector<float>& v, std::vector<float>* o) {
  int64_t rows = 0;
  for (const auto& s : seqs) rows += s.n;
  if (seqs.empty()) return absl::InvalidArgumentError("empty batch");
  const SessionShape* sh0 = nullptr;
  for (const auto& s : seqs) {
    auto it = sessions_.find(s.session);
    if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("no session ", s.session));
    sh0 = &it->second.shape;
  }
  const int Hq = sh0->num_q_heads, Hkv = sh0->num_kv_heads, Dh = sh0->head_dim, grp = Hq / Hkv;
  if (int64_t(q.size()) != rows * Hq * Dh || int64_t(k.size()) != rows * Hkv * Dh || k.size() != v.size())
    return absl::InvalidArgumentError("q/k/v sizes do not match the batch");
  o->assign(size_t(rows) * size_t(Hq * Dh), 0.f);
  const float scale = 1.0f / std::sqrt(float(Dh));
  int64_t row0 = 0;
  for (const auto& s : seqs) {
    Session& ss = sessions_[s.session];
    auto& K = ss.k[size_t(layer)];
    auto& V = ss.v[size_t(layer)];
    const int64_t stride = int64_t(Hkv) * Dh;
    const int64_t len = int64_t(K.size()) / stride;
    if (s.position > len || s.position < 0)
      return absl::FailedPreconditionError(absl::StrCat("position ", s.position, " but the session holds ", len, " tokens"));
    K.resize(size_t(s.position * stride));
    V.resize(size_t(s.position * stride));
    K.insert(K.end(), k.begin() + row0 * stride, k.begin() + (row0 + s.n) * stride);
    V.insert(V.end(), v.begin() + row0 * stride, v.begin() + (row0 + s.n) * stride);
    for (int32_t i = 0; i < s.n; ++i) {
      const int64_t T = s.position + i + 1;  // causal: tokens 0 .. position + i
      std::vector<float> p(static_cast<size_t>(T));
      for (int h = 0; h < Hq; ++h) {
        const int kh = h / grp;
        const float* qv = q.data() + ((row0 + i) * Hq + h) * Dh;
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
          p[size_t(t)] = Dot(qv, K.data() + t * stride + kh * Dh, Dh) * scale;
          mx = std::max(mx, p[size_t(t)]);
        }
        float sum = 0;
        for (int64_t t = 0; t < T; ++t) sum += (p[size_t(t)] = std::exp(p[size_t(t)] - mx));
        float* ov = o->data() + ((row0 + i) * Hq + h) * Dh;
        for (int64_t t = 0; t < T; ++t) {
          const float w = p[size_t(t)] / sum;
          const float* vv = V.data() + t * stride + kh * Dh;
          for (int d = 0; d < Dh; ++d) ov[d] += w * vv[d];
        }
      }
    }
    row0 += s.n;
  }
  return absl::OkStatus();
}

}  // namespace kvq::worker
