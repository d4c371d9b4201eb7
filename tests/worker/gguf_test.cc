// GGUF loader: a good file round trip, truncated files, wrong magic, unsupported types, bad
// shapes, and every supported type's dequantization.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "worker/gguf.h"
#include "worker/half.h"
#include "worker/random_model.h"

namespace kvq::worker {
namespace {

// One Q4_K block and its dequantized values from gguf-py (gguf.quants.dequantize).
static const char* kQ4_KBlock = "1f211f21a94106a0956a26afbccdafe562f90a945f5693c642276ad5ab2da7394551370e99b2d74c3427fa48d732a1df70aca1e926115901dd06f27f8f063cd25e19a621f9bd0ccc21397c1ec795ca7748dc03d17a88934d85527357a2e64647f03e2fb81f223f4192c58efd5185f0711ef7677a1f132a818d882195a100b28d6b236b82481bd9fe630dc3ce3be4ebca";
static const int kQ4_KIndex[] = {0, 1, 31, 32, 63, 64, 100, 128, 129, 200, 255};
static const float kQ4_KExpect[] = {0.6101303100585938f, 3.480743408203125f, 5.9412689208984375f, -0.360076904296875f, -0.29006195068359375f, -0.3800811767578125f, 0.17003631591796875f, 3.0906600952148438f, 4.851036071777344f, 1.8503952026367188f, 3.9808502197265625f};
static const double kQ4_KSum = 372.7896194458008;
// One Q6_K block and its dequantized values from gguf-py (gguf.quants.dequantize).
static const char* kQ6_KBlock = "be3b3f7f1183c3df8375c517b4e786a9aadf7488f892b12191387ad86aca56d8531c927b931fe8f16e795b9b331767e712dbe8f5331dd9917f01e64710dd3c25f4d21690a049453135550ec0193a8bed1783d53ec944658d1d28960c44b0382e93438e60788d51e279a131f8130b3ea4bd2f5d95e57bd791436d840f4e6654608135bbfb885d346959a49b36402a4f3dcc489fb6511fbe09e5d72bf834e04fe028ca4991e02abd77279fedc206d2318ca8b8287a6f4b795209575d7277d456c0f6e81a0e584d730660f56bb8b588475f1f21";
static const int kQ6_KIndex[] = {0, 1, 31, 32, 63, 64, 100, 128, 129, 200, 255};
static const float kQ6_KExpect[] = {0.200042724609375f, 0.5001068115234375f, 5.76123046875f, -7.5416107177734375f, -3.7808074951171875f, -18.48394775390625f, 10.352210998535156f, -26.8857421875f, 1.92041015625f, -2.2504806518554688f, 20.904464721679688f};
static const double kQ6_KSum = -152.62259674072266;

std::vector<float> RandomFloats(size_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> x(n);
  for (auto& e : x) e = d(rng);
  return x;
}

std::string SmallFile(GgmlType type = GgmlType::kQ8_0, uint64_t seed = 11) {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddNumber("llama.block_count", GgufValueType::kU32, 3);
  w.AddNumber("llama.rope.freq_base", GgufValueType::kF32, 10000.5);
  w.AddNumber("some.bool", GgufValueType::kBool, 1);
  w.AddNumber("some.i64", GgufValueType::kI64, -123456789012);
  w.AddStrings("some.strings", {"a", "", "\xc3\xa9t\xc3\xa9"});
  w.AddNumbers("some.ints", GgufValueType::kI32, {1, -2, 3});
  EXPECT_TRUE(w.AddTensor("w", type, {64, 3}, RandomFloats(192, seed)).ok());
  EXPECT_TRUE(w.AddTensor("n", GgmlType::kF32, {64}, RandomFloats(64, seed + 1)).ok());
  return w.Serialize();
}

TEST(Gguf, GoodFileRoundTrip) {
  auto f = GgufFile::FromBytes(SmallFile());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->version(), 3u);
  EXPECT_EQ((*f)->GetString("general.architecture").value(), "llama");
  EXPECT_EQ((*f)->GetNumber("llama.block_count").value(), 3);
  EXPECT_FLOAT_EQ(float((*f)->GetNumber("llama.rope.freq_base").value()), 10000.5f);
  EXPECT_EQ((*f)->GetNumber("some.bool").value(), 1);
  EXPECT_EQ((*f)->GetNumber("some.i64").value(), -123456789012.0);
  const GgufValue* s = (*f)->Find("some.strings");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->strings, (std::vector<std::string>{"a", "", "\xc3\xa9t\xc3\xa9"}));
  EXPECT_EQ((*f)->Find("some.ints")->numbers, (std::vector<double>{1, -2, 3}));
  EXPECT_TRUE(absl::IsNotFound((*f)->GetNumber("missing").status()));
  EXPECT_TRUE(absl::IsInvalidArgument((*f)->GetNumber("general.architecture").status()));
  const GgufTensor* t = (*f)->tensor("w");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->type, GgmlType::kQ8_0);
  EXPECT_EQ(t->dims, (std::vector<int64_t>{64, 3}));
  EXPECT_EQ(t->rows(), 3);
  EXPECT_EQ(t->bytes, 3 * 2 * 34);
  // The F32 tensor reads back exactly.
  const GgufTensor* n = (*f)->tensor("n");
  std::vector<float> back(64);
  DequantizeRow(n->type, n->data, back.data(), 64);
  EXPECT_EQ(back, RandomFloats(64, 12));
  EXPECT_EQ((*f)->tensor("nope"), nullptr);
}

TEST(Gguf, OpenFromDiskAndMissingFile) {
  const std::string path = ::testing::TempDir() + "/kvq_gguf_test.gguf";
  GgufWriter w;
  RandomModelSpec spec;
  spec.num_layers = 1;
  ASSERT_TRUE(WriteRandomModel(spec, &w).ok());
  ASSERT_TRUE(w.WriteFile(path).ok());
  auto f = GgufFile::Open(path, /*progress=*/false);
  ASSERT_TRUE(f.ok()) << f.status();
  {  // the streamed file is byte for byte the in-memory image
    std::ifstream in(path, std::ios::binary);
    const std::string disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(disk, w.Serialize());
  }
  EXPECT_NE((*f)->tensor("blk.0.attn_q.weight"), nullptr);
  auto missing = GgufFile::Open(path + ".does-not-exist");
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
  std::remove(path.c_str());
}

TEST(Gguf, EveryTruncationIsAnErrorNotACrash) {
  const std::string good = SmallFile();
  // Every prefix of the header and metadata, then a stride through the tensor data.
  for (size_t len = 0; len < good.size(); len += (len < 600 ? 1 : 37)) {
    auto f = GgufFile::FromBytes(good.substr(0, len));
    ASSERT_FALSE(f.ok()) << "prefix of " << len << " bytes parsed";
    EXPECT_TRUE(absl::IsInvalidArgument(f.status())) << f.status();
  }
}

TEST(Gguf, WrongMagic) {
  std::string bytes = SmallFile();
  bytes[0] = 'X';
  auto f = GgufFile::FromBytes(bytes);
  ASSERT_FALSE(f.ok());
  EXPECT_NE(std::string(f.status().message()).find("magic"), std::string::npos) << f.status();
}

TEST(Gguf, WrongVersion) {
  std::string bytes = SmallFile();
  bytes[4] = 9;
  auto f = GgufFile::FromBytes(bytes);
  ASSERT_FALSE(f.ok());
  EXPECT_NE(std::string(f.status().message()).find("version"), std::string::npos) << f.status();
}

// Rewrites the type field of tensor "w" (it follows the name, n_dims and dims).
std::string WithTensorType(std::string bytes, uint32_t type) {
  const std::string key = std::string("\x01\0\0\0\0\0\0\0w", 9);
  const size_t at = bytes.find(key);
  EXPECT_NE(at, std::string::npos);
  const size_t type_at = at + key.size() + 4 + 2 * 8;
  std::memcpy(&bytes[type_at], &type, 4);
  return bytes;
}

TEST(Gguf, UnsupportedTensorType) {
  auto f = GgufFile::FromBytes(WithTensorType(SmallFile(), uint32_t(GgmlType::kQ2_K)));
  ASSERT_FALSE(f.ok());
  EXPECT_TRUE(absl::IsUnimplemented(f.status())) << f.status();
  EXPECT_NE(std::string(f.status().message()).find("Q2_K"), std::string::npos) << f.status();
  auto g = GgufFile::FromBytes(WithTensorType(SmallFile(), 977));
  ASSERT_FALSE(g.ok());
  EXPECT_TRUE(absl::IsUnimplemented(g.status())) << g.status();
}

TEST(Gguf, HugeCountsAndBadShapesAreRejected) {
  std::string bytes = SmallFile();
  const uint64_t huge = ~0ull;
  std::string a = bytes;
  std::memcpy(&a[8], &huge, 8);  // tensor count
  EXPECT_FALSE(GgufFile::FromBytes(a).ok());
  std::string b = bytes;
  std::memcpy(&b[16], &huge, 8);  // metadata count
  EXPECT_FALSE(GgufFile::FromBytes(b).ok());
  // A Q8_0 row that is not a whole number of blocks.
  GgufWriter w;
  EXPECT_FALSE(w.AddTensor("x", GgmlType::kQ8_0, {48, 1}, RandomFloats(48, 3)).ok());
}

TEST(Gguf, QuantizeDequantizeEveryWritableType) {
  const auto x = RandomFloats(256, 5, 2.f);
  struct Case { GgmlType t; double tol; };  // tolerance relative to max |x|
  for (const Case& c : {Case{GgmlType::kF32, 0}, Case{GgmlType::kF16, 1e-3}, Case{GgmlType::kBF16, 8e-3},
                        Case{GgmlType::kQ8_0, 1e-2}, Case{GgmlType::kQ4_0, 0.15}, Case{GgmlType::kQ4_1, 0.1}}) {
    std::vector<uint8_t> buf(size_t(GgmlRowBytes(c.t, 256)));
    ASSERT_TRUE(QuantizeRow(c.t, x.data(), buf.data(), 256)) << GgmlTypeName(c.t);
    std::vector<float> y(256);
    DequantizeRow(c.t, buf.data(), y.data(), 256);
    double amax = 0, err = 0;
    for (int i = 0; i < 256; ++i) {
      amax = std::max(amax, double(std::fabs(x[size_t(i)])));
      err = std::max(err, double(std::fabs(x[size_t(i)] - y[size_t(i)])));
    }
    EXPECT_LE(err, c.tol * amax + 1e-12) << GgmlTypeName(c.t);
    if (c.t != GgmlType::kF32) {
      EXPECT_GT(err, 0) << GgmlTypeName(c.t) << " should be lossy on random data";
    }
  }
}

// DotRow (the decode's dot products on the packed blocks) against the dequantized row's dot product
// in double, for rows of 1 to 36 blocks with random weights and inputs (offsets included: inputs
// away from zero make Q4_1's m and Q4_0's -8 d count); false for the types it does not take.
TEST(Gguf, DotRowMatchesTheDequantizedRow) {
  std::mt19937 rng(77);
  for (GgmlType t : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0}) {
    for (int blocks : {1, 2, 3, 18, 36}) {
      const int n = 32 * blocks;
      const auto w = RandomFloats(n, rng(), 1.5f);
      auto x = RandomFloats(n, rng(), 1.f);
      for (auto& v : x) v += 0.75f;
      std::vector<uint8_t> row(size_t(GgmlRowBytes(t, n)));
      ASSERT_TRUE(QuantizeRow(t, w.data(), row.data(), n));
      std::vector<float> wq(static_cast<size_t>(n)), xsum(static_cast<size_t>(blocks));
      DequantizeRow(t, row.data(), wq.data(), n);
      BlockSums32(x.data(), n, xsum.data());
      double ref = 0, mag = 0;
      for (int i = 0; i < n; ++i) {
        ref += double(wq[size_t(i)]) * x[size_t(i)];
        mag += std::fabs(double(wq[size_t(i)]) * x[size_t(i)]);
      }
      float got = std::nanf("");
      ASSERT_TRUE(HasDotRow(t)) << GgmlTypeName(t);
      ASSERT_TRUE(DotRow(t, row.data(), x.data(), xsum.data(), n, &got)) << GgmlTypeName(t);
      EXPECT_NEAR(got, ref, 2e-6 * mag + 1e-6) << GgmlTypeName(t) << " blocks " << blocks;
    }
  }
  const std::vector<float> x(64, 1.f), xsum(2, 32.f);
  std::vector<uint8_t> row(256);
  float out = 123.f;
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ5_1, GgmlType::kQ4_K}) {
    EXPECT_FALSE(HasDotRow(t)) << GgmlTypeName(t);
    EXPECT_FALSE(DotRow(t, row.data(), x.data(), xsum.data(), 64, &out)) << GgmlTypeName(t);
  }
  EXPECT_EQ(out, 123.f);
}

std::vector<uint8_t> FromHex(const char* hex) {
  std::vector<uint8_t> out;
  for (size_t i = 0; hex[i] && hex[i + 1]; i += 2) out.push_back(uint8_t(std::stoi(std::string(hex + i, 2), nullptr, 16)));
  return out;
}

TEST(Gguf, KQuantsMatchGgufPy) {
  struct Case { GgmlType t; const char* hex; const int* idx; const float* expect; size_t n; double sum; };
  for (const Case& c : {Case{GgmlType::kQ4_K, kQ4_KBlock, kQ4_KIndex, kQ4_KExpect, sizeof(kQ4_KIndex) / sizeof(int), kQ4_KSum},
                        Case{GgmlType::kQ6_K, kQ6_KBlock, kQ6_KIndex, kQ6_KExpect, sizeof(kQ6_KIndex) / sizeof(int), kQ6_KSum}}) {
    const auto raw = FromHex(c.hex);
    ASSERT_EQ(int64_t(raw.size()), GgmlRowBytes(c.t, 256));
    std::vector<float> y(256);
    DequantizeRow(c.t, raw.data(), y.data(), 256);
    for (size_t i = 0; i < c.n; ++i) EXPECT_EQ(y[size_t(c.idx[i])], c.expect[i]) << GgmlTypeName(c.t) << " element " << c.idx[i];
    double sum = 0;
    for (float v : y) sum += v;
    EXPECT_NEAR(sum, c.sum, 1e-3) << GgmlTypeName(c.t);
  }
}

TEST(Gguf, HalfConversions) {
  std::mt19937_64 rng(3);
  for (int i = 0; i < 65536; ++i) {
    const uint16_t h = uint16_t(i);
    if ((h & 0x7c00) == 0x7c00) continue;  // inf / NaN
    EXPECT_EQ(FloatToHalf(HalfToFloat(h)), h) << i;
  }
  EXPECT_EQ(FloatToHalf(70000.f), 0x7c00);
  EXPECT_EQ(FloatToHalf(1.0f + 1.0f / 2048), FloatToHalf(1.0f));  // tie to even
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.5f)), 1.5f);
}

}  // namespace
}  // namespace kvq::worker
