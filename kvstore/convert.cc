#include "kvstore/convert.h"

#include "absl/strings/str_cat.h"

namespace kvq::store {
namespace {

absl::StatusOr<kvq::QuantMode> ModeFromProto(v1::QuantMode m) {
  switch (m) {
    case v1::QUANT_MODE_FULL: return kvq::QuantMode::kFull;
    case v1::QUANT_MODE_ASYM: return kvq::QuantMode::kAsym;
    case v1::QUANT_MODE_SYM: return kvq::QuantMode::kSym;
    case v1::QUANT_MODE_HYBRID: return kvq::QuantMode::kHybrid;
    default: return absl::InvalidArgumentError(absl::StrCat("unknown quantization mode ", static_cast<int>(m)));
  }
}

v1::QuantMode ModeToProto(kvq::QuantMode m) {
  switch (m) {
    case kvq::QuantMode::kFull: return v1::QUANT_MODE_FULL;
    case kvq::QuantMode::kAsym: return v1::QUANT_MODE_ASYM;
    case kvq::QuantMode::kSym: return v1::QUANT_MODE_SYM;
    case kvq::QuantMode::kHybrid: return v1::QUANT_MODE_HYBRID;
  }
  return v1::QUANT_MODE_UNSPECIFIED;
}

absl::StatusOr<kvq::TensorFormat> TensorFromProto(const v1::TensorFormat& t, const char* name) {
  kvq::TensorFormat f;
  auto mode = ModeFromProto(t.mode());
  if (!mode.ok()) return absl::InvalidArgumentError(absl::StrCat(name, ": ", mode.status().message()));
  f.mode = *mode;
  f.bits = t.bits();
  if (f.mode == kvq::QuantMode::kFull) {
    if (f.bits == 0) f.bits = 16;
  } else {
    switch (t.grouping()) {
      case v1::GROUPING_ALONG_TOKENS: f.grouping = kvq::Grouping::kAlongTokens; break;
      case v1::GROUPING_ALONG_CHANNELS: f.grouping = kvq::Grouping::kAlongChannels; break;
      default: return absl::InvalidArgumentError(absl::StrCat(name, ": grouping must be given"));
    }
    f.group_size = t.group_size();
    f.keep = t.keep();
    f.flush = t.flush();
  }
  return f;
}

void TensorToProto(const kvq::TensorFormat& f, v1::TensorFormat* t) {
  t->set_mode(ModeToProto(f.mode));
  t->set_bits(f.bits);
  if (!f.quantized()) return;
  t->set_grouping(f.grouping == kvq::Grouping::kAlongTokens ? v1::GROUPING_ALONG_TOKENS
                                                            : v1::GROUPING_ALONG_CHANNELS);
  t->set_group_size(f.group_size);
  t->set_keep(f.keep);
  t->set_flush(f.flush);
}

}  // namespace

absl::StatusOr<kvq::DType> FromProto(v1::DType d) {
  switch (d) {
    case v1::DTYPE_F16: return kvq::DType::kF16;
    case v1::DTYPE_BF16: return kvq::DType::kBF16;
    default: return absl::InvalidArgumentError("dtype must be DTYPE_F16 or DTYPE_BF16");
  }
}

v1::DType ToProto(kvq::DType d) { return d == kvq::DType::kBF16 ? v1::DTYPE_BF16 : v1::DTYPE_F16; }

absl::StatusOr<kvq::Preset> FromProto(v1::Preset p) {
  switch (p) {
    case v1::PRESET_FP16: return kvq::Preset::kFp16;
    case v1::PRESET_KIVI2: return kvq::Preset::kKivi2;
    case v1::PRESET_KIVI4: return kvq::Preset::kKivi4;
    case v1::PRESET_INNERQ: return kvq::Preset::kInnerQ;
    case v1::PRESET_INNERQ2: return kvq::Preset::kInnerQ2;
    case v1::PRESET_INNERQ_BASE: return kvq::Preset::kInnerQBase;
    default: return absl::InvalidArgumentError(absl::StrCat("unknown preset ", static_cast<int>(p)));
  }
}

v1::Preset ToProto(kvq::Preset p) {
  switch (p) {
    case kvq::Preset::kFp16: return v1::PRESET_FP16;
    case kvq::Preset::kKivi2: return v1::PRESET_KIVI2;
    case kvq::Preset::kKivi4: return v1::PRESET_KIVI4;
    case kvq::Preset::kInnerQ: return v1::PRESET_INNERQ;
    case kvq::Preset::kInnerQ2: return v1::PRESET_INNERQ2;
    case kvq::Preset::kInnerQBase: return v1::PRESET_INNERQ_BASE;
  }
  return v1::PRESET_UNSPECIFIED;
}

absl::StatusOr<kvq::QuantConfig> FromProto(const v1::QuantConfig& c) {
  kvq::QuantConfig q;
  auto k = TensorFromProto(c.k(), "config.k");
  if (!k.ok()) return k.status();
  auto v = TensorFromProto(c.v(), "config.v");
  if (!v.ok()) return v.status();
  q.k = *k;
  q.v = *v;
  q.sink = c.sink();
  q.key_norm = c.key_norm();
  return q;
}

v1::QuantConfig ToProto(const kvq::QuantConfig& c) {
  v1::QuantConfig out;
  TensorToProto(c.k, out.mutable_k());
  TensorToProto(c.v, out.mutable_v());
  out.set_sink(c.sink);
  out.set_key_norm(c.key_norm);
  return out;
}

absl::StatusOr<SessionSpec> SpecFromProto(const v1::CreateSessionRequest& req) {
  SessionSpec spec;
  const v1::ModelShape& sh = req.shape();
  spec.num_layers = sh.num_layers();
  spec.num_q_heads = sh.num_q_heads();
  spec.cache.num_kv_heads = sh.num_kv_heads();
  spec.cache.head_dim = sh.head_dim();
  auto dtype = FromProto(sh.dtype());
  if (!dtype.ok()) return dtype.status();
  spec.cache.dtype = *dtype;
  switch (req.quant_case()) {
    case v1::CreateSessionRequest::kPreset: {
      auto p = FromProto(req.preset());
      if (!p.ok()) return p.status();
      spec.has_preset = true;
      spec.preset = *p;
      spec.cache.config = kvq::PresetConfig(*p);
      break;
    }
    case v1::CreateSessionRequest::kConfig: {
      auto c = FromProto(req.config());
      if (!c.ok()) return c.status();
      spec.cache.config = *c;
      break;
    }
    default:
      return absl::InvalidArgumentError("give a quantization preset or an explicit config");
  }
  spec.max_tokens = req.max_tokens();
  spec.softmax_scale = req.softmax_scale();
  const std::string err = Store::ValidateSpec(spec);
  if (!err.empty()) return absl::InvalidArgumentError(err);
  return spec;
}

void ToProto(const SessionSnapshot& s, v1::SessionInfo* out) {
  out->set_session_id(s.id);
  v1::ModelShape* sh = out->mutable_shape();
  sh->set_num_layers(s.spec.num_layers);
  sh->set_num_q_heads(s.spec.num_q_heads);
  sh->set_num_kv_heads(s.spec.cache.num_kv_heads);
  sh->set_head_dim(s.spec.cache.head_dim);
  sh->set_dtype(ToProto(s.spec.cache.dtype));
  out->set_preset(s.spec.has_preset ? ToProto(s.spec.preset) : v1::PRESET_UNSPECIFIED);
  *out->mutable_config() = ToProto(s.spec.cache.config);
  out->set_format_version(kvq::kFormatVersion);
  for (int32_t l : s.layer_lengths) out->add_layer_lengths(l);
  for (int32_t m : s.layer_min_positions) out->add_layer_min_positions(m);
  v1::ByteCounts* b = out->mutable_bytes();
  b->set_codes(s.bytes.codes);
  b->set_scales(s.bytes.scales);
  b->set_full_precision(s.bytes.full_precision);
  b->set_metadata(s.bytes.metadata);
  b->set_total(s.bytes.total());
  out->set_fp16_equivalent_bytes(s.fp16_equivalent_bytes);
  out->set_max_tokens(s.spec.max_tokens);
  out->set_softmax_scale(s.spec.softmax_scale);
}

}  // namespace kvq::store
