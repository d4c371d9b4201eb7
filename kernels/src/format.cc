#include "kvq/format.h"

#include <string>

namespace kvq {
namespace {

TensorFormat Full() { return TensorFormat{}; }

bool IsPow2GroupSize(int g) { return g == 32 || g == 64 || g == 128; }

std::string ValidateTensor(const TensorFormat& f, int head_dim, const char* name) {
  const std::string n(name);
  if (!f.quantized()) {
    if (f.bits != 16) return n + ": full precision needs bits = 16";
    return "";
  }
  if (f.bits != 2 && f.bits != 3 && f.bits != 4 && f.bits != 8)
    return n + ": bits must be 2, 3, 4 or 8, got " + std::to_string(f.bits);
  if (f.mode != QuantMode::kAsym && f.mode != QuantMode::kSym && f.mode != QuantMode::kHybrid)
    return n + ": unknown quantization mode";
  if (!IsPow2GroupSize(f.group_size))
    return n + ": group_size must be 32, 64 or 128, got " + std::to_string(f.group_size);
  if (f.grouping == Grouping::kAlongChannels) {
    if (head_dim % f.group_size != 0)
      return n + ": along_channels group_size " + std::to_string(f.group_size) +
             " does not divide head_dim " + std::to_string(head_dim);
  } else if (f.grouping == Grouping::kAlongTokens) {
    if (f.flush % f.group_size != 0)
      return n + ": along_tokens flush " + std::to_string(f.flush) +
             " is not a multiple of group_size " + std::to_string(f.group_size);
  } else {
    return n + ": unknown grouping";
  }
  if (f.keep < 0 || f.keep > 65536) return n + ": keep must be in [0, 65536]";
  if (f.flush < 1 || f.flush > 65536) return n + ": flush must be in [1, 65536]";
  return "";
}

}  // namespace

TensorFormat QuantFormat32(QuantMode mode, int bits, Grouping grouping, int keep, int flush) {
  TensorFormat f;
  f.mode = mode;
  f.bits = bits;
  f.grouping = grouping;
  f.group_size = 32;
  f.keep = keep;
  f.flush = flush;
  return f;
}

QuantConfig PresetConfig(Preset preset) {
  QuantConfig c;
  switch (preset) {
    case Preset::kFp16:
      c.k = Full();
      c.v = Full();
      break;
    case Preset::kKivi2:
    case Preset::kKivi4: {
      const int b = preset == Preset::kKivi2 ? 2 : 4;
      c.k = QuantFormat32(QuantMode::kAsym, b, Grouping::kAlongTokens, 0, 128);
      c.v = QuantFormat32(QuantMode::kAsym, b, Grouping::kAlongChannels, 128, 1);
      break;
    }
    case Preset::kInnerQ:
      c.k = QuantFormat32(QuantMode::kSym, 3, Grouping::kAlongChannels, 96, 1);
      c.v = QuantFormat32(QuantMode::kHybrid, 2, Grouping::kAlongTokens, 96, 32);
      c.sink = 32;
      c.key_norm = true;
      break;
    case Preset::kInnerQ2:
      c.k = QuantFormat32(QuantMode::kHybrid, 2, Grouping::kAlongChannels, 96, 1);
      c.v = QuantFormat32(QuantMode::kHybrid, 2, Grouping::kAlongTokens, 96, 32);
      c.sink = 32;
      c.key_norm = true;
      break;
    case Preset::kInnerQBase:
      c.k = QuantFormat32(QuantMode::kSym, 3, Grouping::kAlongChannels, 96, 1);
      c.v = QuantFormat32(QuantMode::kSym, 3, Grouping::kAlongTokens, 96, 32);
      c.sink = 32;
      c.key_norm = true;
      break;
  }
  return c;
}

const char* PresetName(Preset preset) {
  switch (preset) {
    case Preset::kFp16: return "fp16";
    case Preset::kKivi2: return "kivi2";
    case Preset::kKivi4: return "kivi4";
    case Preset::kInnerQ: return "innerq";
    case Preset::kInnerQ2: return "innerq2";
    case Preset::kInnerQBase: return "innerq_base";
  }
  return "unknown";
}

bool ParsePreset(const std::string& name, Preset* out) {
  for (Preset p : {Preset::kFp16, Preset::kKivi2, Preset::kKivi4, Preset::kInnerQ, Preset::kInnerQ2,
                   Preset::kInnerQBase}) {
    if (name == PresetName(p)) {
      *out = p;
      return true;
    }
  }
  return false;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF16: return "fp16";
    case DType::kBF16: return "bf16";
  }
  return "unknown";
}

std::string ValidateConfig(const QuantConfig& config, int head_dim) {
  if (head_dim != 64 && head_dim != 128 && head_dim != 256)
    return "head_dim must be 64, 128 or 256, got " + std::to_string(head_dim);
  std::string e = ValidateTensor(config.k, head_dim, "k");
  if (!e.empty()) return e;
  e = ValidateTensor(config.v, head_dim, "v");
  if (!e.empty()) return e;
  if (config.sink < 0 || config.sink > kMaxSink)
    return "sink must be in [0, " + std::to_string(kMaxSink) + "], got " + std::to_string(config.sink);
  if (config.key_norm && !config.k.quantized()) return "key_norm needs quantized keys";
  return "";
}

std::string ValidateShape(const CacheShape& shape) {
  if (shape.num_kv_heads < 1 || shape.num_kv_heads > 1024)
    return "num_kv_heads must be in [1, 1024], got " + std::to_string(shape.num_kv_heads);
  if (shape.dtype != DType::kF16 && shape.dtype != DType::kBF16) return "dtype must be fp16 or bf16";
  return ValidateConfig(shape.config, shape.head_dim);
}

StreamLayout MakeStreamLayout(const TensorFormat& f, int num_kv_heads, int head_dim) {
  StreamLayout l;
  l.fp_page_bytes = int64_t{kPageTokens} * num_kv_heads * head_dim * 2;
  if (!f.quantized()) return l;
  l.groups_per_head = kPageTokens * head_dim / f.group_size;
  l.words_per_group = f.group_size * f.bits / 32;
  const int64_t codes = AlignUp16(int64_t{l.groups_per_head} * l.words_per_group * 4);
  const int64_t scales = AlignUp16(int64_t{l.groups_per_head} * 2);
  l.scales_offset = codes;
  l.zeros_offset = codes + scales;
  l.head_bytes = codes + scales + (f.has_zeros() ? scales : 0);
  l.quant_page_bytes = l.head_bytes * num_kv_heads;
  return l;
}

}  // namespace kvq
