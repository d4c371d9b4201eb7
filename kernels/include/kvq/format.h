// KV-cache quantization formats: configs, presets, validation and the stored layout.
// The specification is ../shared/design/QUANT_FORMATS.md; this header is its code form and is
// shared by the CPU reference, the CUDA kernels and the store. No gRPC, protobuf or Prometheus.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define KVQ_HD __host__ __device__ __forceinline__
#else
#define KVQ_HD inline
#endif

namespace kvq {

// Version of the stored format; travels in the protocol and in any snapshot of a session.
constexpr int kFormatVersion = 1;
// Tokens per page, for every stream (sink, window, body). Group sizes (32/64/128) divide it, so an
// along_tokens group never crosses a page.
constexpr int kPageTokens = 128;
constexpr int kMaxSink = kPageTokens;  // the sink lives in one page

// Byte offset of token `slot` of KV head `h` in a full-precision page (sink or window) of D-wide
// fp16/bf16 rows. Pages are head-major, [Hkv][kPageTokens][D], so one head's tokens are
// contiguous: a 32-token tile of one head is one 8 KB run at D = 128 (not 32 rows 256 bytes wide,
// Hkv x 256 bytes apart), which is how the decode kernels read them.
KVQ_HD int64_t FullTokenOffset(int slot, int h, int d) {
  return (static_cast<int64_t>(h) * kPageTokens + slot) * d * 2;
}

enum class DType : uint8_t { kF16 = 1, kBF16 = 2 };
enum class QuantMode : uint8_t { kFull = 0, kAsym = 1, kSym = 2, kHybrid = 3 };
enum class Grouping : uint8_t { kAlongTokens = 1, kAlongChannels = 2 };
enum class Preset : uint8_t { kFp16 = 1, kKivi2 = 2, kKivi4 = 3, kInnerQ = 4, kInnerQ2 = 5, kInnerQBase = 6 };

// Format of one tensor (K or V) of a cache.
struct TensorFormat {
  QuantMode mode = QuantMode::kFull;
  int bits = 16;                         // 2, 3, 4, 8 when quantized; 16 for kFull
  Grouping grouping = Grouping::kAlongChannels;
  int group_size = 32;                   // G: 32, 64 or 128
  int keep = 0;                          // R: full-precision tokens kept after a flush
  int flush = 1;                         // F: tokens quantized at a time (multiple of G for along_tokens)
  bool quantized() const { return mode != QuantMode::kFull; }
  bool has_zeros() const { return mode == QuantMode::kAsym || mode == QuantMode::kHybrid; }
};

struct QuantConfig {
  TensorFormat k, v;
  int sink = 0;           // S full-precision tokens at the start, 0..kMaxSink
  bool key_norm = false;  // InnerQ key normalization (needs quantized keys)
};

struct CacheShape {
  int num_kv_heads = 0;   // Hkv
  int head_dim = 0;       // D: 64, 128 or 256
  DType dtype = DType::kF16;
  QuantConfig config;
};

// A quantized tensor format with G = 32 (the presets' group size).
TensorFormat QuantFormat32(QuantMode mode, int bits, Grouping grouping, int keep, int flush);

QuantConfig PresetConfig(Preset preset);
const char* PresetName(Preset preset);
// Parses "fp16", "kivi2", ... ; returns false for an unknown name.
bool ParsePreset(const std::string& name, Preset* out);
const char* DTypeName(DType dtype);

// Returns "" when the config is valid for this head_dim, else a message naming the bad field.
std::string ValidateConfig(const QuantConfig& config, int head_dim);
// Validates shape and config together (Hkv >= 1, D in {64,128,256}, ...).
std::string ValidateShape(const CacheShape& shape);

// Stored layout of one tensor stream (K or V) of one layer, all KV heads of a page together.
//   full-precision page (sink, window): [Hkv][kPageTokens][D] activation dtype (2 bytes), FullTokenOffset
//   quantized body page, for each KV head h in order, at h * head_bytes:
//     codes  [groups_per_head][words_per_group] uint32  (bitstream of a group: code i at bit i*b,
//                                                         a code may straddle two words)
//     scales [groups_per_head] fp16 bits                 (at scales_offset)
//     zeros  [groups_per_head] fp16 bits                 (at zeros_offset; asym and hybrid only)
//   group index inside a head's page, for token slot t (0..kPageTokens-1) and channel c:
//     along_channels: g = t * (D / G) + c / G, element i = c % G
//     along_tokens:   g = (t / G) * D + c,     element i = t % G
// Every region is 16-byte aligned.
struct StreamLayout {
  int64_t fp_page_bytes = 0;
  int32_t groups_per_head = 0;
  int32_t words_per_group = 0;
  int64_t scales_offset = 0;   // bytes from the head's start
  int64_t zeros_offset = 0;    // bytes from the head's start (== head_bytes when no zeros)
  int64_t head_bytes = 0;
  int64_t quant_page_bytes = 0;  // 0 for an unquantized tensor
};
StreamLayout MakeStreamLayout(const TensorFormat& f, int num_kv_heads, int head_dim);

KVQ_HD int64_t AlignUp16(int64_t x) { return (x + 15) & ~int64_t{15}; }

}  // namespace kvq
