// A Llama-family transformer (Llama, Mistral, Qwen2, SmolLM2) from a GGUF file, minus attention:
// embeddings, RMSNorm, q/k/v/o projections (optional biases), RoPE, SwiGLU MLP and logits on the
// CPU, with dequantize-on-the-fly matrix products over the memory-mapped weights, threaded.
// Attention goes through an AttentionBackend, one call per layer for the whole batch.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/attention.h"
#include "worker/gguf.h"
#include "worker/tokenizer.h"

namespace kvq::worker {

struct ModelConfig {
  std::string arch;          // general.architecture
  std::string name;          // general.name
  int num_layers = 0;
  int d_model = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int d_ff = 0;
  int vocab_size = 0;
  int context_length = 0;
  float rope_theta = 10000.f;
  float rope_linear_scale = 1.f;   // positions are divided by this (rope.scaling.type linear)
  bool rope_neox = false;          // rotate halves (Qwen2 ...) instead of adjacent pairs (Llama)
  float norm_eps = 1e-5f;
  bool tied_embeddings = false;    // no output.weight: logits use token_embd
  SessionShape session_shape() const { return {num_layers, num_heads, num_kv_heads, head_dim}; }
};

// One sequence's part of a forward step: tokens at positions position .. position + n - 1.
struct SeqChunk {
  std::string session;
  int32_t position = 0;
  std::vector<int32_t> tokens;
  bool want_logits = true;  // logits of the last token
};

class ThreadPool;
class CudaMatMul;

// The OpenBLAS core type this CPU should run (OPENBLAS_CORETYPE) when the library's own choice falls
// short of the CPU's vector units: OpenBLAS picks its kernels from the CPU's model, and a virtual
// machine's generic model ("Intel Xeon Processor") makes it fall back to its SSE3 ones (Prescott)
// where AVX2 / AVX-512 are there, which halves the prefill's sgemm. Empty when the choice is fine,
// the variable is set already, or the build has no OpenBLAS. The variable is read when the library
// loads: a process that gets a name sets it and starts again (kvq-worker does).
std::string BlasCoreTypeOverride();

class Model {
 public:
  // Loads the GGUF file (progress bar on stderr if asked) and validates every tensor's shape.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& path, bool progress, int threads = 0);
  static absl::StatusOr<std::unique_ptr<Model>> FromFile(std::unique_ptr<GgufFile> file, int threads = 0);
  ~Model();

  // Moves the matrix products to the GPU (weights uploaded once as fp16; cuBLAS). An error when
  // the build has no CUDA or there is no device. Call before the first Forward.
  absl::Status UseCuda();
  bool on_gpu() const { return gpu_ != nullptr; }
  std::string compute_device() const;

  const ModelConfig& config() const { return cfg_; }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }  // null when the file has none
  const GgufFile& file() const { return *file_; }

  // Runs one step for a batch of sequences. logits: [number of chunks with want_logits, vocab],
  // in chunk order.
  absl::Status Forward(const std::vector<SeqChunk>& chunks, AttentionBackend* attention, std::vector<float>* logits);

  // Matrix products with at least this many rows use BLAS sgemm (when built with it); fewer
  // rows (decoding) use the worker's own dequantize-and-dot loop.
  static constexpr int64_t kBlasMinRows = 32;
  // Building blocks (also used by the layer test against a plain reference).
  // y[r, o] = sum_i x[r, i] * W[o, i] for a GGUF weight W with dims {in, out}.
  void MatMul(const GgufTensor& w, const float* x, int64_t rows, float* y) const;
  void RmsNorm(const float* x, const GgufTensor& w, int64_t rows, float* y) const;
  // Rotates `heads` heads of head_dim in place, for rows at the given positions.
  void Rope(float* x, int64_t rows, int heads, const std::vector<int32_t>& positions) const;

 private:
  struct Layer {
    const GgufTensor *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w_gate, *w_up, *w_down;
    const GgufTensor *bq = nullptr, *bk = nullptr, *bv = nullptr;
  };
  Model() = default;
  absl::Status Init(int threads);

  std::unique_ptr<GgufFile> file_;
  ModelConfig cfg_;
  std::unique_ptr<Tokenizer> tokenizer_;
  const GgufTensor* tok_embd_ = nullptr;
  const GgufTensor* out_norm_ = nullptr;
  const GgufTensor* output_ = nullptr;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<CudaMatMul> gpu_;
  std::map<const GgufTensor*, int> gpu_handle_;
  mutable std::string gpu_error_;  // first GPU failure in a step; Forward reports it
};

// A plain full-precision attention backend: every session's K/V in float, exact softmax. The
// reference the quantized backends are compared with, and the layer-math test's backend.
class ExactAttention : public AttentionBackend {
 public:
  absl::StatusOr<std::string> CreateSession(const SessionShape& shape, const std::string& preset) override;
  absl::Status DeleteSession(const std::string& session) override;
  absl::StatusOr<int32_t> SessionLength(const std::string& session) override;
  absl::Status Attend(int layer, const std::vector<AttendSeq>& seqs, const std::vector<float>& q,
                      const std::vector<float>& k, const std::vector<float>& v, std::vector<float>* o) override;

 private:
  struct Session {
    SessionShape shape;
    std::vector<std::vector<float>> k, v;  // per layer [T, Hkv, D]
  };
  std::map<std::string, Session> sessions_;
  int next_id_ = 1;
};

}  // namespace kvq::worker
