// GGUF model files: a bounds-checked reader over a memory-mapped file, the ggml tensor types the
// worker supports (dequantization to float, one row at a time), and a writer (random-weight test
// models, the generator tool). Every malformed or unsupported file gives a clear error, never a
// crash: the reader checks every length against the file size before it reads.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvq::worker {

// ggml tensor types (values as in the GGUF files).
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15, kBF16 = 30,
};
const char* GgmlTypeName(GgmlType t);  // "Q4_1", ... ; "type<N>" for unknown values
// Elements per block and bytes per block; false when the worker cannot compute with the type.
bool GgmlTypeInfo(GgmlType t, int64_t* block_elems, int64_t* block_bytes);
// Bytes of a row of n elements (n a multiple of the block size; -1 otherwise or unsupported).
int64_t GgmlRowBytes(GgmlType t, int64_t n);
// Dequantizes n elements (a multiple of the block size) starting at src.
void DequantizeRow(GgmlType t, const uint8_t* src, float* dst, int64_t n);
// The dot product of one row of n elements with x, on the packed blocks (no dequantized copy of the
// row), for the block types of the decode's matrix-vector products: Q4_0, Q4_1, Q8_0. False (and
// nothing written) for the other types, which DequantizeRow serves. xsum: BlockSums32 of x, which
// carries the blocks' offsets (Q4_1's m, Q4_0's -8 d).
bool DotRow(GgmlType t, const uint8_t* row, const float* x, const float* xsum, int64_t n, float* out);
// Whether DotRow takes rows of this type.
bool HasDotRow(GgmlType t);
// xsum[b] = x[32 b] + ... + x[32 b + 31] for the n / 32 blocks of x.
void BlockSums32(const float* x, int64_t n, float* xsum);
// Quantizes n float elements (for the writer; F32, F16, BF16, Q8_0, Q4_0, Q4_1). False otherwise.
bool QuantizeRow(GgmlType t, const float* src, uint8_t* dst, int64_t n);

// GGUF metadata value types.
enum class GgufValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8,
  kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

struct GgufValue {
  GgufValueType type = GgufValueType::kU32;
  GgufValueType elem_type = GgufValueType::kU32;  // arrays only
  double number = 0;                 // every numeric or bool scalar
  std::string str;                   // kString
  std::vector<double> numbers;       // numeric arrays
  std::vector<std::string> strings;  // string arrays
};

struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the contiguous (row) dimension
  const uint8_t* data = nullptr;
  int64_t bytes = 0;
  int64_t elements() const;
  int64_t row_elems() const { return dims.empty() ? 1 : dims[0]; }
  int64_t rows() const { return row_elems() == 0 ? 0 : elements() / row_elems(); }
};

class GgufFile {
 public:
  // Maps and parses the file. `progress` shows a bar on stderr while the tensor data is read in.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path, bool progress = false);
  // Parses an in-memory image (tests); the bytes are copied.
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromBytes(const std::string& bytes);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  const GgufValue* Find(const std::string& key) const;
  // Typed look-ups: NotFound / InvalidArgument naming the key.
  absl::StatusOr<double> GetNumber(const std::string& key) const;
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  double NumberOr(const std::string& key, double fallback) const;
  const GgufTensor* tensor(const std::string& name) const;
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const std::map<std::string, GgufValue>& metadata() const { return kv_; }

 private:
  GgufFile() = default;
  absl::Status Parse(const std::string& what);

  const uint8_t* base_ = nullptr;
  int64_t size_ = 0;
  void* mapping_ = nullptr;  // munmap on destruction when set
  std::string owned_;        // FromBytes
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> kv_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> by_name_;
};

// Builds a GGUF file in memory (version 3, alignment 32).
class GgufWriter {
 public:
  void AddNumber(const std::string& key, GgufValueType type, double value);
  void AddString(const std::string& key, const std::string& value);
  void AddStrings(const std::string& key, const std::vector<std::string>& values);
  void AddNumbers(const std::string& key, GgufValueType elem_type, const std::vector<double>& values);
  // dims in ggml order (dims[0] contiguous); data in float, quantized to `type` row by row.
  absl::Status AddTensor(const std::string& name, GgmlType type, const std::vector<int64_t>& dims,
                         const std::vector<float>& data);
  std::string Serialize() const;
  absl::Status WriteFile(const std::string& path) const;  // streams; same bytes as Serialize()

 private:
  std::string Header(std::vector<uint64_t>* offsets) const;
  std::string kv_blob_;
  int64_t kv_count_ = 0;
  struct Pending { std::string name; GgmlType type; std::vector<int64_t> dims; std::string bytes; };
  std::vector<Pending> tensors_;
};

}  // namespace kvq::worker
