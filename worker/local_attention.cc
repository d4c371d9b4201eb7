#include "worker/local_attention.h"

#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"
#include "kvq/format.h"
#include "kvq/reference.h"
#include "worker/half.h"

namespace kvq::worker {

HostPagePool::HostPagePool(int64_t capacity_bytes) : arena_(size_t(capacity_bytes)) {}

bool HostPagePool::Allocate(int64_t bytes, int64_t* offset) {
  bytes = (bytes + 15) & ~int64_t{15};
  auto it = free_.find(bytes);
  if (it != free_.end() && !it->second.empty()) {
    *offset = it->second.back();
    it->second.pop_back();
    used_ += bytes;
    return true;
  }
  if (top_ + bytes > int64_t(arena_.size())) return false;
  *offset = top_;
  top_ += bytes;
  used_ += bytes;
  return true;
}

void HostPagePool::Free(int64_t offset, int64_t bytes) {
  bytes = (bytes + 15) & ~int64_t{15};
  free_[bytes].push_back(offset);
  used_ -= bytes;
}

LocalAttention::LocalAttention(int64_t arena_bytes, int threads) : pool_(arena_bytes), threads_(threads) {}

LocalAttention::~LocalAttention() {
  for (auto& [id, s] : sessions_)
    for (auto& l : s->layers) l.Release(pool_);
}

absl::StatusOr<std::string> LocalAttention::CreateSession(const SessionShape& shape, const std::string& preset) {
  kvq::Preset p;
  if (!kvq::ParsePreset(preset, &p)) return absl::InvalidArgumentError(absl::StrCat("unknown preset '", preset, "'"));
  if (shape.num_layers < 1 || shape.num_kv_heads < 1 || shape.num_q_heads % shape.num_kv_heads != 0)
    return absl::InvalidArgumentError("bad session shape");
  kvq::CacheShape cs;
  cs.num_kv_heads = shape.num_kv_heads;
  cs.head_dim = shape.head_dim;
  cs.dtype = kvq::DType::kF16;
  cs.config = kvq::PresetConfig(p);
  const std::string err = kvq::ValidateShape(cs);
  if (!err.empty()) return absl::InvalidArgumentError(err);
  auto s = std::make_unique<Session>();
  s->shape = shape;
  s->config = cs.config;
  for (int l = 0; l < shape.num_layers; ++l) s->layers.emplace_back(cs);
  const std::string id = absl::StrCat("local-", next_id_++);
  sessions_.emplace(id, std::move(s));
  return id;
}

absl::Status LocalAttention::DeleteSession(const std::string& session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("no session ", session));
  for (auto& l : it->second->layers) l.Release(pool_);
  sessions_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int32_t> LocalAttention::SessionLength(const std::string& session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("no session ", session));
  int32_t len = INT32_MAX;
  for (const auto& l : it->second->layers) len = std::min(len, l.length());
  return len;
}

absl::StatusOr<std::pair<int64_t, int64_t>> LocalAttention::SessionBytes(const std::string& session) const {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("no session ", session));
  int64_t stored = 0, fp16 = 0;
  const auto& sh = it->second->shape;
  for (const auto& l : it->second->layers) {
    stored += l.bytes().total();
    fp16 += int64_t(l.length()) * 2 /*K,V*/ * sh.num_kv_heads * sh.head_dim * 2;
  }
  return std::make_pair(stored, fp16);
}

absl::Status LocalAttention::Attend(int layer, const std::vector<AttendSeq>& seqs, const std::vector<float>& q,
                                    const std::vector<float>& k, const std::vector<float>& v, std::vector<float>* o) {
  if (seqs.empty()) return absl::InvalidArgumentError("empty batch");
  std::vector<Session*> ss;
  int64_t rows = 0;
  for (const auto& s : seqs) {
    auto it = sessions_.find(s.session);
    if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("no session ", s.session));
    if (layer < 0 || layer >= int(it->second->layers.size())) return absl::InvalidArgumentError("bad layer");
    ss.push_back(it->second.get());
    rows += s.n;
  }
  const SessionShape sh = ss[0]->shape;
  const int64_t qd = int64_t(sh.num_q_heads) * sh.head_dim, kvd = int64_t(sh.num_kv_heads) * sh.head_dim;
  if (int64_t(q.size()) != rows * qd || int64_t(k.size()) != rows * kvd || int64_t(v.size()) != rows * kvd)
    return absl::InvalidArgumentError("q/k/v sizes do not match the batch");
  std::vector<uint16_t> qh(q.size()), kh(k.size()), vh(v.size()), oh(q.size());
  for (size_t i = 0; i < q.size(); ++i) qh[i] = FloatToHalf(q[i]);
  for (size_t i = 0; i < k.size(); ++i) kh[i] = FloatToHalf(k[i]);
  for (size_t i = 0; i < v.size(); ++i) vh[i] = FloatToHalf(v[i]);
  std::vector<kvq::StepPlan> plans(seqs.size());
  std::vector<kvq::SeqWork> works;
  std::vector<kvq::QuantConfig> configs;
  int64_t row0 = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    kvq::LayerCache& lc = ss[i]->layers[size_t(layer)];
    kvq::Result r = lc.Plan(seqs[i].position, seqs[i].n, pool_, &plans[i]);
    if (!r.ok()) {
      for (size_t j = 0; j < i; ++j) kvq::LayerCache::Abort(&plans[j], pool_);
      const std::string msg = absl::StrCat("session ", seqs[i].session, " layer ", layer, ": ", r.message);
      if (r.code == kvq::Code::kResourceExhausted) return absl::ResourceExhaustedError(msg);
      if (r.code == kvq::Code::kFailedPrecondition) return absl::FailedPreconditionError(msg);
      return absl::InvalidArgumentError(msg);
    }
    plans[i].work.kv_row = row0;
    plans[i].work.q_row = row0;
    works.push_back(plans[i].work);
    configs.push_back(ss[i]->config);
    row0 += seqs[i].n;
  }
  kvq::StepParams p;
  p.num_q_heads = sh.num_q_heads;
  p.num_kv_heads = sh.num_kv_heads;
  p.head_dim = sh.head_dim;
  p.dtype = kvq::DType::kF16;
  p.q = qh.data();
  p.k_new = kh.data();
  p.v_new = vh.data();
  p.o = oh.data();
  kvq::Result r = kvq::CpuRunStep(p, works.data(), configs.data(), int(works.size()), pool_.base(), threads_);
  if (!r.ok()) {
    for (auto& pl : plans) kvq::LayerCache::Abort(&pl, pool_);
    return absl::InternalError(absl::StrCat("attention step failed: ", r.message));
  }
  for (size_t i = 0; i < seqs.size(); ++i) ss[i]->layers[size_t(layer)].Commit(&plans[i], pool_);
  o->resize(oh.size());
  for (size_t i = 0; i < oh.size(); ++i) (*o)[i] = HalfToFloat(oh[i]);
  return absl::OkStatus();
}

}  // namespace kvq::worker
