// The transformer's math against a plain double-precision reference written here from the Llama
// definition (RMSNorm, q/k/v, RoPE on adjacent pairs, causal GQA attention, SwiGLU, tied logits),
// for weights in several GGUF types; plus incremental decoding and batching equal to one prefill.
#include <gtest/gtest.h>

#include <cstdlib>

#include <cmath>
#include <random>
#include <vector>

#include "worker/gguf.h"
#include "worker/model.h"
#include "worker/random_model.h"

namespace kvq::worker {
namespace {

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

Mat Load(const GgufFile& f, const std::string& name) {
  const GgufTensor* t = f.tensor(name);
  EXPECT_NE(t, nullptr) << name;
  Mat m(size_t(t->rows()), std::vector<double>(size_t(t->row_elems())));
  std::vector<float> row(static_cast<size_t>(t->row_elems()));
  const int64_t rb = GgmlRowBytes(t->type, t->row_elems());
  for (int64_t r = 0; r < t->rows(); ++r) {
    DequantizeRow(t->type, t->data + r * rb, row.data(), t->row_elems());
    for (size_t c = 0; c < row.size(); ++c) m[size_t(r)][c] = row[c];
  }
  return m;
}

std::vector<double> MatVec(const Mat& w, const std::vector<double>& x) {
  std::vector<double> y(w.size());
  for (size_t o = 0; o < w.size(); ++o)
    for (size_t i = 0; i < x.size(); ++i) y[o] += w[o][i] * x[i];
  return y;
}

std::vector<double> Norm(const std::vector<double>& x, const std::vector<double>& g, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * g[i];
  return y;
}

// Logits of the last token of `tokens` by the plain reference.
std::vector<double> ReferenceLogits(const GgufFile& f, const ModelConfig& c, const std::vector<int32_t>& tokens) {
  const Mat emb = Load(f, "token_embd.weight");
  const size_t T = tokens.size(), D = size_t(c.d_model), Dh = size_t(c.head_dim);
  std::vector<std::vector<double>> x(T);
  for (size_t t = 0; t < T; ++t) x[t] = emb[size_t(tokens[t])];
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    const Mat wq = Load(f, p + "attn_q.weight"), wk = Load(f, p + "attn_k.weight"), wv = Load(f, p + "attn_v.weight");
    const Mat wo = Load(f, p + "attn_output.weight"), wg = Load(f, p + "ffn_gate.weight"), wu = Load(f, p + "ffn_up.weight");
    const Mat wd = Load(f, p + "ffn_down.weight");
    const auto an = Load(f, p + "attn_norm.weight")[0], fn = Load(f, p + "ffn_norm.weight")[0];
    std::vector<std::vector<double>> q(T), k(T), v(T);
    for (size_t t = 0; t < T; ++t) {
      const auto h = Norm(x[t], an, c.norm_eps);
      q[t] = MatVec(wq, h);
      k[t] = MatVec(wk, h);
      v[t] = MatVec(wv, h);
      for (auto* vec : {&q[t], &k[t]}) {
        for (size_t h0 = 0; h0 < vec->size(); h0 += Dh)
          for (size_t i = 0; i < Dh / 2; ++i) {
            const double freq = std::pow(double(c.rope_theta), -2.0 * double(i) / double(Dh));
            const double a = double(t) * freq;
            const double x0 = (*vec)[h0 + 2 * i], x1 = (*vec)[h0 + 2 * i + 1];
            (*vec)[h0 + 2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
            (*vec)[h0 + 2 * i + 1] = x1 * std::cos(a) + x0 * std::sin(a);
          }
      }
    }
    const size_t grp = size_t(c.num_heads / c.num_kv_heads);
    for (size_t t = 0; t < T; ++t) {
      std::vector<double> o(size_t(c.num_heads) * Dh);
      for (size_t h = 0; h < size_t(c.num_heads); ++h) {
        const size_t kh = h / grp;
        std::vector<double> s(t + 1);
        double mx = -1e300, sum = 0;
        for (size_t u = 0; u <= t; ++u) {
          for (size_t d = 0; d < Dh; ++d) s[u] += q[t][h * Dh + d] * k[u][kh * Dh + d];
          s[u] /= std::sqrt(double(Dh));
          mx = std::max(mx, s[u]);
        }
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (size_t u = 0; u <= t; ++u)
          for (size_t d = 0; d < Dh; ++d) o[h * Dh + d] += s[u] / sum * v[u][kh * Dh + d];
      }
      const auto ao = MatVec(wo, o);
      for (size_t i = 0; i < D; ++i) x[t][i] += ao[i];
      const auto h2 = Norm(x[t], fn, c.norm_eps);
      auto g = MatVec(wg, h2);
      const auto u = MatVec(wu, h2);
      for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
      const auto dn = MatVec(wd, g);
      for (size_t i = 0; i < D; ++i) x[t][i] += dn[i];
    }
  }
  const auto hn = Norm(x[T - 1], Load(f, "output_norm.weight")[0], c.norm_eps);
  return MatVec(emb, hn);
}

std::unique_ptr<Model> TinyModel(GgmlType type, int layers, uint64_t seed) {
  RandomModelSpec s;
  s.num_layers = layers;
  s.d_model = 64;
  s.num_heads = 4;
  s.num_kv_heads = 2;
  s.d_ff = 96;
  s.weight_type = type;
  s.seed = seed;
  GgufWriter w;
  EXPECT_TRUE(WriteRandomModel(s, &w).ok());
  auto f = GgufFile::FromBytes(w.Serialize());
  EXPECT_TRUE(f.ok()) << f.status();
  auto m = Model::FromFile(std::move(*f), 2);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(*m);
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& e : t) e = int32_t(rng() % uint64_t(vocab));
  return t;
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<double>& b) {
  double scale = 0, diff = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    scale = std::max(scale, std::fabs(b[i]));
    diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
  }
  return diff / scale;
}

class LayerMath : public ::testing::TestWithParam<GgmlType> {};

TEST_P(LayerMath, OneLayerMatchesThePlainReference) {
  auto m = TinyModel(GetParam(), 1, 7);
  const auto tokens = RandomTokens(9, m->config().vocab_size, 3);
  ExactAttention attn;
  auto sid = attn.CreateSession(m->config().session_shape(), "fp16");
  ASSERT_TRUE(sid.ok());
  std::vector<float> logits;
  ASSERT_TRUE(m->Forward({{*sid, 0, tokens, true}}, &attn, &logits).ok());
  const auto ref = ReferenceLogits(m->file(), m->config(), tokens);
  ASSERT_EQ(logits.size(), ref.size());
  EXPECT_LT(MaxRelDiff(logits, ref), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Types, LayerMath,
                         ::testing::Values(GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0,
                                           GgmlType::kQ4_0, GgmlType::kQ4_1),
                         [](const auto& info) { return std::string(GgmlTypeName(info.param)); });

TEST(Model, LongPrefillMatchesThePlainReference) {
  // Enough rows for the many-row (BLAS) matrix product path.
  auto m = TinyModel(GgmlType::kQ4_1, 1, 9);
  const auto tokens = RandomTokens(int(Model::kBlasMinRows) + 9, m->config().vocab_size, 4);
  ExactAttention attn;
  auto sid = attn.CreateSession(m->config().session_shape(), "fp16");
  std::vector<float> logits;
  ASSERT_TRUE(m->Forward({{*sid, 0, tokens, true}}, &attn, &logits).ok());
  EXPECT_LT(MaxRelDiff(logits, ReferenceLogits(m->file(), m->config(), tokens)), 1e-4);
}

TEST(Model, TwoLayersIncrementalAndBatchedEqualOnePrefill) {
  auto m = TinyModel(GgmlType::kQ8_0, 2, 21);
  const int V = m->config().vocab_size;
  const auto a = RandomTokens(12, V, 5), b = RandomTokens(5, V, 6);
  const auto ref_a = ReferenceLogits(m->file(), m->config(), a);
  ExactAttention attn;
  // Sequence a: a prefill of 7, then one token at a time, batched with sequence b's prefill.
  auto sa = attn.CreateSession(m->config().session_shape(), "fp16");
  auto sb = attn.CreateSession(m->config().session_shape(), "fp16");
  ASSERT_TRUE(sa.ok() && sb.ok());
  std::vector<float> logits;
  ASSERT_TRUE(m->Forward({{*sa, 0, {a.begin(), a.begin() + 7}, false}}, &attn, &logits).ok());
  EXPECT_TRUE(logits.empty());
  for (int t = 7; t < 12; ++t) {
    std::vector<SeqChunk> batch = {{*sa, t, {a[size_t(t)]}, true}};
    if (t == 9) batch.push_back({*sb, 0, b, true});
    ASSERT_TRUE(m->Forward(batch, &attn, &logits).ok());
    if (t == 9) {
      ASSERT_EQ(logits.size(), size_t(2 * V));
      const std::vector<float> lb(logits.begin() + V, logits.end());
      EXPECT_LT(MaxRelDiff(lb, ReferenceLogits(m->file(), m->config(), b)), 1e-4);
    }
  }
  logits.resize(size_t(V));
  EXPECT_LT(MaxRelDiff(logits, ref_a), 1e-4);
  EXPECT_EQ(attn.SessionLength(*sa).value(), 12);
  // A retry at an earlier position truncates and recomputes (repair by position).
  ASSERT_TRUE(m->Forward({{*sa, 11, {a[11]}, true}}, &attn, &logits).ok());
  EXPECT_LT(MaxRelDiff(logits, ref_a), 1e-4);
}

TEST(Model, CudaMatrixProductsMatchTheCpu) {
  auto gpu = TinyModel(GgmlType::kQ8_0, 2, 41);
  const absl::Status st = gpu->UseCuda();
  if (absl::IsFailedPrecondition(st)) GTEST_SKIP() << st.message();
  ASSERT_TRUE(st.ok()) << st;
  auto cpu = TinyModel(GgmlType::kQ8_0, 2, 41);
  for (int n : {5, int(Model::kBlasMinRows) + 3}) {
    const auto tokens = RandomTokens(n, cpu->config().vocab_size, uint64_t(n));
    ExactAttention a, b;
    auto sa = a.CreateSession(cpu->config().session_shape(), "fp16");
    auto sb = b.CreateSession(gpu->config().session_shape(), "fp16");
    std::vector<float> lc, lg;
    ASSERT_TRUE(cpu->Forward({{*sa, 0, tokens, true}}, &a, &lc).ok());
    ASSERT_TRUE(gpu->Forward({{*sb, 0, tokens, true}}, &b, &lg).ok());
    std::vector<double> ref(lc.begin(), lc.end());
    EXPECT_LT(MaxRelDiff(lg, ref), 2e-2) << n << " tokens";  // fp16 weights and inputs on the GPU
  }
}

// The OpenBLAS core type the worker restarts with: none once the variable is set (the user's choice,
// or the restart's own), else none or one this CPU's vector units run.
TEST(Model, BlasCoreTypeOverride) {
  const char* before = std::getenv("OPENBLAS_CORETYPE");
  const std::string saved = before ? before : "";
  setenv("OPENBLAS_CORETYPE", "Prescott", 1);
  EXPECT_EQ(BlasCoreTypeOverride(), "");
  unsetenv("OPENBLAS_CORETYPE");
  const std::string core = BlasCoreTypeOverride();
  if (!core.empty()) {
    EXPECT_TRUE(core == "SkylakeX" || core == "Haswell") << core;
#if defined(__x86_64__) && defined(__GNUC__)
    EXPECT_TRUE(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
    if (core == "SkylakeX") {
      EXPECT_TRUE(__builtin_cpu_supports("avx512f"));
    }
#endif
  }
  if (before) setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
}

TEST(Model, BadInputsAreErrors) {
  auto m = TinyModel(GgmlType::kQ8_0, 1, 2);
  ExactAttention attn;
  auto sid = attn.CreateSession(m->config().session_shape(), "fp16");
  std::vector<float> logits;
  EXPECT_TRUE(absl::IsInvalidArgument(m->Forward({{*sid, 0, {m->config().vocab_size}, true}}, &attn, &logits)));
  EXPECT_TRUE(absl::IsInvalidArgument(m->Forward({{*sid, 0, {}, true}}, &attn, &logits)));
  EXPECT_TRUE(absl::IsFailedPrecondition(m->Forward({{*sid, 5, {1}, true}}, &attn, &logits)));
  EXPECT_TRUE(absl::IsNotFound(m->Forward({{"nope", 0, {1}, true}}, &attn, &logits)));
}

TEST(Model, MissingTensorOrBadMetadataIsAnError) {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddNumber("llama.block_count", GgufValueType::kU32, 1);
  auto f = GgufFile::FromBytes(w.Serialize());
  ASSERT_TRUE(f.ok());
  auto m = Model::FromFile(std::move(*f));
  EXPECT_FALSE(m.ok());
  GgufWriter w2;
  w2.AddString("general.architecture", "gpt-neox");
  auto f2 = GgufFile::FromBytes(w2.Serialize());
  EXPECT_TRUE(absl::IsUnimplemented(Model::FromFile(std::move(*f2)).status()));
}

}  // namespace
}  // namespace kvq::worker
