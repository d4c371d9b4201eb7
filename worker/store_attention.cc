#include "worker/store_attention.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "kvq/format.h"
#include "worker/half.h"

namespace kvq::worker {
namespace v1 = ::kvq::v1;

absl::Status FromGrpc(const grpc::Status& st) {
  if (st.ok()) return absl::OkStatus();
  return absl::Status(absl::StatusCode(int(st.error_code())), st.error_message());
}

grpc::Status ToGrpc(const absl::Status& st) {
  if (st.ok()) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode(int(st.code())), std::string(st.message()));
}

namespace {

bool PresetToProto(const std::string& name, v1::Preset* out) {
  kvq::Preset p;
  if (!kvq::ParsePreset(name, &p)) return false;
  switch (p) {
    case kvq::Preset::kFp16: *out = v1::PRESET_FP16; return true;
    case kvq::Preset::kKivi2: *out = v1::PRESET_KIVI2; return true;
    case kvq::Preset::kKivi4: *out = v1::PRESET_KIVI4; return true;
    case kvq::Preset::kInnerQ: *out = v1::PRESET_INNERQ; return true;
    case kvq::Preset::kInnerQ2: *out = v1::PRESET_INNERQ2; return true;
    case kvq::Preset::kInnerQBase: *out = v1::PRESET_INNERQ_BASE; return true;
  }
  return false;
}

std::string ToF16Bytes(const float* x, int64_t n) {
  std::string out(size_t(n) * 2, '\0');
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = FloatToHalf(x[i]);
    std::memcpy(&out[size_t(i) * 2], &h, 2);
  }
  return out;
}

}  // namespace

StoreAttention::StoreAttention(StoreOptions options) : opts_(std::move(options)) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  channel_ = grpc::CreateCustomChannel(opts_.target, grpc::InsecureChannelCredentials(), args);
  stub_ = v1::KVStore::NewStub(channel_);
}

void StoreAttention::Prepare(grpc::ClientContext* ctx, double timeout_s) const {
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(int64_t(timeout_s * 1000)));
  if (!opts_.auth_token.empty()) ctx->AddMetadata("authorization", "Bearer " + opts_.auth_token);
}

absl::StatusOr<std::string> StoreAttention::CreateSession(const SessionShape& shape, const std::string& preset) {
  v1::CreateSessionRequest req;
  v1::Preset p;
  if (!PresetToProto(preset, &p)) return absl::InvalidArgumentError(absl::StrCat("unknown preset '", preset, "'"));
  req.set_preset(p);
  auto* s = req.mutable_shape();
  s->set_num_layers(shape.num_layers);
  s->set_num_q_heads(shape.num_q_heads);
  s->set_num_kv_heads(shape.num_kv_heads);
  s->set_head_dim(shape.head_dim);
  s->set_dtype(v1::DTYPE_F16);
  v1::CreateSessionResponse resp;
  grpc::ClientContext ctx;
  Prepare(&ctx, opts_.rpc_timeout_s);
  const grpc::Status st = stub_->CreateSession(&ctx, req, &resp);
  if (!st.ok()) return absl::Status(FromGrpc(st).code(), absl::StrCat("store CreateSession: ", st.error_message()));
  shapes_[resp.session_id()] = shape;
  return resp.session_id();
}

absl::Status StoreAttention::DeleteSession(const std::string& session) {
  v1::DropSessionRequest req;
  req.set_session_id(session);
  v1::DropSessionResponse resp;
  grpc::ClientContext ctx;
  Prepare(&ctx, opts_.rpc_timeout_s);
  shapes_.erase(session);
  return FromGrpc(stub_->DropSession(&ctx, req, &resp));
}

absl::StatusOr<v1::SessionInfo> StoreAttention::GetSession(const std::string& session) {
  v1::GetSessionRequest req;
  req.set_session_id(session);
  v1::GetSessionResponse resp;
  grpc::ClientContext ctx;
  Prepare(&ctx, opts_.rpc_timeout_s);
  const grpc::Status st = stub_->GetSession(&ctx, req, &resp);
  if (!st.ok()) return absl::Status(FromGrpc(st).code(), absl::StrCat("store GetSession: ", st.error_message()));
  return resp.session();
}

absl::StatusOr<int32_t> StoreAttention::SessionLength(const std::string& session) {
  auto info = GetSession(session);
  if (!info.ok()) return info.status();
  const auto& sh = info->shape();
  shapes_[session] = {sh.num_layers(), sh.num_q_heads(), sh.num_kv_heads(), sh.head_dim()};
  if (info->layer_lengths().empty()) return 0;
  int32_t len = info->layer_lengths(0);
  for (int32_t l : info->layer_lengths()) len = std::min(len, l);
  return len;
}

absl::Status StoreAttention::SessionBytes(const std::string& session, int64_t* stored, int64_t* fp16_equivalent,
                                          int32_t* length) {
  auto info = GetSession(session);
  if (!info.ok()) return info.status();
  *stored = info->bytes().total();
  *fp16_equivalent = info->fp16_equivalent_bytes();
  *length = 0;
  if (!info->layer_lengths().empty()) {
    *length = info->layer_lengths(0);
    for (int32_t l : info->layer_lengths()) *length = std::min(*length, l);
  }
  return absl::OkStatus();
}

absl::Status StoreAttention::BeginStep() {
  failed_.clear();
  step_ctx_ = std::make_unique<grpc::ClientContext>();
  Prepare(step_ctx_.get(), opts_.rpc_timeout_s);
  stream_ = stub_->Attend(step_ctx_.get());
  if (stream_ == nullptr) return absl::UnavailableError("cannot open the Attend stream to the store");
  return absl::OkStatus();
}

absl::Status StoreAttention::EndStep() {
  if (stream_ == nullptr) return absl::OkStatus();
  stream_->WritesDone();
  const grpc::Status st = stream_->Finish();
  stream_.reset();
  step_ctx_.reset();
  if (!st.ok()) return absl::Status(FromGrpc(st).code(), absl::StrCat("store Attend stream: ", st.error_message()));
  return absl::OkStatus();
}

std::vector<std::pair<std::string, absl::Status>> StoreAttention::TakeFailed() {
  std::vector<std::pair<std::string, absl::Status>> out;
  out.swap(failed_);
  return out;
}

absl::Status StoreAttention::Attend(int layer, const std::vector<AttendSeq>& seqs, const std::vector<float>& q,
                                    const std::vector<float>& k, const std::vector<float>& v, std::vector<float>* o) {
  if (stream_ == nullptr) return absl::FailedPreconditionError("Attend outside a step");
  if (seqs.empty()) return absl::InvalidArgumentError("empty batch");
  auto it = shapes_.find(seqs[0].session);
  if (it == shapes_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", seqs[0].session));
  const SessionShape sh = it->second;
  const int64_t qd = int64_t(sh.num_q_heads) * sh.head_dim, kvd = int64_t(sh.num_kv_heads) * sh.head_dim;
  int64_t rows = 0;
  for (const auto& s : seqs) rows += s.n;
  if (int64_t(q.size()) != rows * qd || int64_t(k.size()) != rows * kvd || int64_t(v.size()) != rows * kvd)
    return absl::InvalidArgumentError("q/k/v sizes do not match the batch");
  o->assign(q.size(), 0.f);
  v1::AttendRequest req;
  req.set_step_id(++step_id_);
  req.set_layer(layer);
  req.set_dtype(v1::DTYPE_F16);
  std::vector<size_t> sent;  // batch index of each entry
  std::vector<int64_t> row_of(seqs.size());
  int64_t r = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    row_of[i] = r;
    const auto& s = seqs[i];
    r += s.n;
    bool skip = false;
    for (const auto& f : failed_) skip |= f.first == s.session;
    if (skip) continue;  // failed in an earlier layer of this step: retried as a whole later
    auto* e = req.add_entries();
    e->set_session_id(s.session);
    e->set_position(s.position);
    e->set_num_tokens(s.n);
    e->set_q(ToF16Bytes(q.data() + row_of[i] * qd, s.n * qd));
    e->set_k(ToF16Bytes(k.data() + row_of[i] * kvd, s.n * kvd));
    e->set_v(ToF16Bytes(v.data() + row_of[i] * kvd, s.n * kvd));
    sent.push_back(i);
  }
  if (sent.empty()) return absl::OkStatus();
  const auto t0 = std::chrono::steady_clock::now();
  v1::AttendResponse resp;
  if (!stream_->Write(req) || !stream_->Read(&resp)) {
    const grpc::Status st = stream_->Finish();
    stream_.reset();
    return absl::Status(st.ok() ? absl::StatusCode::kUnavailable : FromGrpc(st).code(),
                        absl::StrCat("store Attend stream broke at layer ", layer, ": ", st.error_message()));
  }
  last_rtt_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (rtt_observer_) rtt_observer_(last_rtt_);
  if (resp.results_size() != int(sent.size()))
    return absl::InternalError(absl::StrCat("store answered ", resp.results_size(), " results for ", sent.size(), " entries"));
  for (size_t j = 0; j < sent.size(); ++j) {
    const size_t i = sent[j];
    const auto& res = resp.results(int(j));
    if (res.code() != 0) {
      failed_.emplace_back(seqs[i].session, absl::Status(absl::StatusCode(res.code()),
                                                         absl::StrCat("store, layer ", layer, ": ", res.message())));
      continue;
    }
    const int64_t n = int64_t(seqs[i].n) * qd;
    if (int64_t(res.o().size()) != n * 2) {
      failed_.emplace_back(seqs[i].session, absl::InternalError("store returned o of the wrong size"));
      continue;
    }
    const char* src = res.o().data();
    float* dst = o->data() + row_of[i] * qd;
    for (int64_t x = 0; x < n; ++x) {
      uint16_t h;
      std::memcpy(&h, src + 2 * x, 2);
      dst[x] = HalfToFloat(h);
    }
  }
  return absl::OkStatus();
}

}  // namespace kvq::worker
