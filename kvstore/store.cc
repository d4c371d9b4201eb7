#include "kvstore/store.h"

#include <sys/random.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "kvstore/status.h"

namespace kvq::store {

struct Store::Session {
  std::string id;
  Tenant* tenant = nullptr;
  SessionSpec spec;
  std::mutex mu;
  bool dropped = false;               // guarded by mu
  std::vector<kvq::LayerCache> layers;  // guarded by mu
  // Cached totals, guarded by mu; mirrored into the store's and the tenant's counters.
  int64_t tokens = 0;                 // max layer length
  kvq::CacheBytes bytes;
  int64_t fp16_equiv = 0;
};

struct Store::Planned {
  kvq::StepPlan plan;
  kvq::StepPlan flush;                // StoreOptions::flush_after: the flush after the attention
  bool flush_planned = false;         // its pages are held (else its work flushes nothing)
  bool active = false;
  int64_t token_reserve = 0;          // tokens charged to the tenant before the step
};

namespace {

constexpr int32_t kMaxLayers = 1024;
constexpr int32_t kMaxHeads = 1024;
constexpr int64_t kMaxPosition = int64_t{1} << 30;
constexpr float kFp16Max = 65504.f;

std::string NewSessionId() {
  uint8_t raw[16];
  size_t got = 0;
  while (got < sizeof(raw)) {
    const ssize_t r = getrandom(raw + got, sizeof(raw) - got, 0);
    if (r > 0) got += static_cast<size_t>(r);
  }
  static const char* kHex = "0123456789abcdef";
  std::string id(32, '0');
  for (int i = 0; i < 16; ++i) {
    id[2 * i] = kHex[raw[i] >> 4];
    id[2 * i + 1] = kHex[raw[i] & 15];
  }
  return id;
}

float Bf16ToFloat(uint16_t b) {
  const uint32_t u = uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// "" when every element is finite (and, with `fp16_range`, within +-65504), else a message naming
// the first bad element.
std::string CheckValues(std::string_view bytes, kvq::DType dtype, bool fp16_range, const char* name) {
  const size_t n = bytes.size() / 2;
  const char* p = bytes.data();
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    if (dtype == kvq::DType::kF16) {
      if ((h & 0x7C00u) == 0x7C00u) return absl::StrCat(name, " has NaN or inf at element ", i);
    } else {
      if ((h & 0x7F80u) == 0x7F80u) return absl::StrCat(name, " has NaN or inf at element ", i);
      if (fp16_range && std::fabs(Bf16ToFloat(h)) > kFp16Max)
        return absl::StrCat(name, " element ", i, " = ", Bf16ToFloat(h),
                            " is beyond the fp16 range of the quantization scales (|x| <= 65504)");
    }
  }
  return "";
}

absl::Status ValidateEntry(const SessionSpec& spec, int32_t layer, kvq::DType dtype, const AttendInput& in,
                           int32_t max_tokens_per_entry) {
  if (layer < 0 || layer >= spec.num_layers)
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range [0, ", spec.num_layers, ")"));
  if (dtype != spec.cache.dtype)
    return absl::InvalidArgumentError(absl::StrCat("dtype mismatch: request is ", kvq::DTypeName(dtype),
                                                   ", session is ", kvq::DTypeName(spec.cache.dtype)));
  if (in.num_tokens < 1 || in.num_tokens > max_tokens_per_entry)
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens must be in [1, ", max_tokens_per_entry, "], got ", in.num_tokens));
  if (in.position < 0) return absl::InvalidArgumentError(absl::StrCat("position must be >= 0, got ", in.position));
  if (int64_t{in.position} + in.num_tokens > kMaxPosition)
    return absl::InvalidArgumentError(absl::StrCat("position + num_tokens exceeds ", kMaxPosition));
  const int64_t hd = spec.cache.head_dim;
  const int64_t q_bytes = int64_t{in.num_tokens} * spec.num_q_heads * hd * 2;
  const int64_t kv_bytes = int64_t{in.num_tokens} * spec.cache.num_kv_heads * hd * 2;
  auto size_error = [&](const char* name, size_t got, int64_t want, int heads) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has ", got, " bytes, want ", want, " = n ", in.num_tokens,
                                                   " x heads ", heads, " x head_dim ", hd, " x 2"));
  };
  if (static_cast<int64_t>(in.q.size()) != q_bytes) return size_error("q", in.q.size(), q_bytes, spec.num_q_heads);
  if (static_cast<int64_t>(in.k.size()) != kv_bytes)
    return size_error("k", in.k.size(), kv_bytes, spec.cache.num_kv_heads);
  if (static_cast<int64_t>(in.v.size()) != kv_bytes)
    return size_error("v", in.v.size(), kv_bytes, spec.cache.num_kv_heads);
  std::string e = CheckValues(in.k, dtype, true, "k");
  if (e.empty()) e = CheckValues(in.v, dtype, true, "v");
  if (e.empty()) e = CheckValues(in.q, dtype, false, "q");
  if (!e.empty()) return absl::InvalidArgumentError(e);
  return absl::OkStatus();
}

int64_t Fp16Equivalent(const SessionSpec& spec, int64_t tokens) {
  return tokens * spec.cache.num_kv_heads * spec.cache.head_dim * 2 /*K and V*/ * 2 /*bytes*/;
}

absl::Status Prefixed(const absl::Status& s, const std::string& prefix) {
  return absl::Status(s.code(), prefix + std::string(s.message()));
}

}  // namespace

std::string Store::ValidateSpec(const SessionSpec& spec) {
  if (spec.num_layers < 1 || spec.num_layers > kMaxLayers)
    return absl::StrCat("num_layers must be in [1, ", kMaxLayers, "], got ", spec.num_layers);
  const std::string shape_error = kvq::ValidateShape(spec.cache);
  if (!shape_error.empty()) return shape_error;
  if (spec.num_q_heads < 1 || spec.num_q_heads > kMaxHeads || spec.num_q_heads % spec.cache.num_kv_heads != 0)
    return absl::StrCat("num_q_heads must be a multiple of num_kv_heads (", spec.cache.num_kv_heads, ") in [1, ",
                        kMaxHeads, "], got ", spec.num_q_heads);
  if (spec.max_tokens < 0) return absl::StrCat("max_tokens must be >= 0, got ", spec.max_tokens);
  if (!std::isfinite(spec.softmax_scale) || spec.softmax_scale < 0)
    return absl::StrCat("softmax_scale must be finite and >= 0 (0 = 1/sqrt(head_dim)), got ", spec.softmax_scale);
  return "";
}

Store::Store(StoreOptions options, std::unique_ptr<Backend> backend, StoreEvents* events)
    : options_(options), backend_(std::move(backend)), events_(events) {}

Store::~Store() {
  std::unique_lock<std::shared_mutex> lock(table_mu_);
  for (auto& [id, s] : sessions_) {
    std::lock_guard<std::mutex> sl(s->mu);
    ReleaseLocked(*s);
  }
  sessions_.clear();
}

void Store::QuotaRejected() {
  if (events_ != nullptr) events_->OnQuotaRejection();
}

absl::StatusOr<std::string> Store::CreateSession(Tenant& tenant, const SessionSpec& spec) {
  const std::string err = ValidateSpec(spec);
  if (!err.empty()) return absl::InvalidArgumentError(err);
  int64_t cur = num_sessions_.load();
  do {
    if (cur >= options_.max_sessions)
      return absl::ResourceExhaustedError(absl::StrCat("the store holds its maximum of ", options_.max_sessions,
                                                       " sessions"));
  } while (!num_sessions_.compare_exchange_weak(cur, cur + 1));
  // Admission: the session's first step needs a K and a V page in every layer; refuse a session
  // that could not take one step rather than fail it later.
  const int64_t min_bytes = int64_t{spec.num_layers} * 2 *
                            kvq::MakeStreamLayout(spec.cache.config.k, spec.cache.num_kv_heads, spec.cache.head_dim)
                                .fp_page_bytes;
  const int64_t pool_free = backend_->pool_capacity() - backend_->pool_used();
  if (pool_free < min_bytes) {
    num_sessions_.fetch_sub(1);
    return absl::ResourceExhaustedError(absl::StrCat("the page pool has ", pool_free,
                                                     " bytes free; a new session of this shape needs at least ",
                                                     min_bytes));
  }
  if (tenant.quota().max_bytes > 0 && tenant.bytes() + min_bytes > tenant.quota().max_bytes) {
    num_sessions_.fetch_sub(1);
    QuotaRejected();
    return absl::ResourceExhaustedError(absl::StrCat("tenant '", tenant.name(), "' byte quota of ",
                                                     tenant.quota().max_bytes, " bytes cannot hold a new session (",
                                                     min_bytes, " bytes for its first step)"));
  }
  if (!tenant.TryAddSessions(1)) {
    num_sessions_.fetch_sub(1);
    QuotaRejected();
    return absl::ResourceExhaustedError(absl::StrCat("tenant '", tenant.name(), "' session quota of ",
                                                     tenant.quota().max_sessions, " reached"));
  }
  auto s = std::make_shared<Session>();
  s->tenant = &tenant;
  s->spec = spec;
  s->layers.reserve(spec.num_layers);
  for (int i = 0; i < spec.num_layers; ++i) s->layers.emplace_back(spec.cache);
  std::unique_lock<std::shared_mutex> lock(table_mu_);
  do {
    s->id = NewSessionId();
  } while (sessions_.count(s->id) != 0);
  sessions_.emplace(s->id, s);
  return s->id;
}

std::shared_ptr<Store::Session> Store::Find(Tenant& tenant, std::string_view id) const {
  std::shared_lock<std::shared_mutex> lock(table_mu_);
  auto it = sessions_.find(std::string(id));
  if (it == sessions_.end() || it->second->tenant != &tenant) return nullptr;
  return it->second;
}

SessionSnapshot Store::Snapshot(const Session& s) const {
  SessionSnapshot snap;
  snap.id = s.id;
  snap.spec = s.spec;
  for (const auto& lc : s.layers) {
    snap.layer_lengths.push_back(lc.length());
    snap.layer_min_positions.push_back(lc.min_position());
  }
  snap.bytes = s.bytes;
  snap.fp16_equivalent_bytes = s.fp16_equiv;
  return snap;
}

absl::StatusOr<SessionSnapshot> Store::GetSession(Tenant& tenant, std::string_view id) {
  auto s = Find(tenant, id);
  if (!s) return absl::NotFoundError("session not found");
  std::lock_guard<std::mutex> lock(s->mu);
  if (s->dropped) return absl::NotFoundError("session not found");
  return Snapshot(*s);
}

std::vector<SessionSnapshot> Store::ListSessions(Tenant& tenant) {
  std::vector<std::shared_ptr<Session>> mine;
  {
    std::shared_lock<std::shared_mutex> lock(table_mu_);
    for (auto& [id, s] : sessions_)
      if (s->tenant == &tenant) mine.push_back(s);
  }
  std::vector<SessionSnapshot> out;
  for (auto& s : mine) {
    std::lock_guard<std::mutex> lock(s->mu);
    if (!s->dropped) out.push_back(Snapshot(*s));
  }
  std::sort(out.begin(), out.end(), [](const SessionSnapshot& a, const SessionSnapshot& b) { return a.id < b.id; });
  return out;
}

void Store::ReleaseLocked(Session& s) {
  if (s.dropped) return;
  s.dropped = true;
  TenantAllocator alloc(backend_->allocator(), *s.tenant);
  for (auto& lc : s.layers) lc.Release(alloc);
  tokens_.fetch_sub(s.tokens);
  codes_.fetch_sub(s.bytes.codes);
  scales_.fetch_sub(s.bytes.scales);
  full_precision_.fetch_sub(s.bytes.full_precision);
  metadata_.fetch_sub(s.bytes.metadata);
  fp16_equiv_.fetch_sub(s.fp16_equiv);
  s.tenant->AddTokens(-s.tokens);
  s.tenant->AddSessions(-1);
  num_sessions_.fetch_sub(1);
  s.tokens = 0;
  s.bytes = {};
  s.fp16_equiv = 0;
}

absl::Status Store::DropSession(Tenant& tenant, std::string_view id) {
  std::shared_ptr<Session> s;
  {
    std::unique_lock<std::shared_mutex> lock(table_mu_);
    auto it = sessions_.find(std::string(id));
    if (it == sessions_.end() || it->second->tenant != &tenant) return absl::NotFoundError("session not found");
    s = std::move(it->second);
    sessions_.erase(it);
  }
  std::lock_guard<std::mutex> lock(s->mu);
  ReleaseLocked(*s);
  return absl::OkStatus();
}

void Store::Resettle(Session& s) {
  kvq::CacheBytes b;
  int64_t tokens = 0, fp16 = 0;
  for (const auto& lc : s.layers) {
    const kvq::CacheBytes lb = lc.bytes();
    b.codes += lb.codes;
    b.scales += lb.scales;
    b.full_precision += lb.full_precision;
    b.metadata += lb.metadata;
    tokens = std::max<int64_t>(tokens, lc.length());
    fp16 += Fp16Equivalent(s.spec, lc.length());
  }
  tokens_.fetch_add(tokens - s.tokens);
  codes_.fetch_add(b.codes - s.bytes.codes);
  scales_.fetch_add(b.scales - s.bytes.scales);
  full_precision_.fetch_add(b.full_precision - s.bytes.full_precision);
  metadata_.fetch_add(b.metadata - s.bytes.metadata);
  fp16_equiv_.fetch_add(fp16 - s.fp16_equiv);
  s.tokens = tokens;
  s.bytes = b;
  s.fp16_equiv = fp16;
}

AttendSummary Store::Attend(Tenant& tenant, int32_t layer, kvq::DType dtype, const std::vector<AttendInput>& inputs,
                            std::vector<AttendOutput>* outputs) {
  AttendSummary summary;
  const int n = static_cast<int>(inputs.size());
  summary.entries = n;
  std::vector<AttendOutput>& out = *outputs;
  std::vector<std::shared_ptr<Session>> sess(n);

  // 1. Look up and validate every entry before touching any state.
  std::unordered_set<const Session*> seen;
  for (int i = 0; i < n; ++i) {
    auto s = Find(tenant, inputs[i].session_id);
    if (!s) {
      out[i].status = absl::NotFoundError("session not found");
      continue;
    }
    if (!seen.insert(s.get()).second) {
      out[i].status = absl::InvalidArgumentError("the session appears in an earlier entry of this request");
      continue;
    }
    absl::Status st = ValidateEntry(s->spec, layer, dtype, inputs[i], options_.max_tokens_per_entry);
    if (!st.ok()) {
      out[i].status = std::move(st);
      continue;
    }
    if (inputs[i].num_tokens > 1) summary.prefill = true;
    sess[i] = std::move(s);
  }

  // 2. Lock the sessions in address order (no deadlock between concurrent requests).
  std::vector<int> order;
  for (int i = 0; i < n; ++i)
    if (sess[i]) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return sess[a].get() < sess[b].get(); });
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(order.size());
  for (int i : order) locks.emplace_back(sess[i]->mu);

  // 3. Plan each entry (pages allocated against the tenant's quota, positions checked).
  std::vector<Planned> planned(n);
  for (int i : order) {
    Session& s = *sess[i];
    const AttendInput& in = inputs[i];
    if (s.dropped) {
      out[i].status = absl::NotFoundError("session not found");
      continue;
    }
    const int64_t new_len = int64_t{in.position} + in.num_tokens;
    if (s.spec.max_tokens > 0 && new_len > s.spec.max_tokens) {
      out[i].status = absl::ResourceExhaustedError(
          absl::StrCat("the step would grow the session to ", new_len, " tokens, beyond its max_tokens ",
                       s.spec.max_tokens));
      continue;
    }
    TenantAllocator alloc(backend_->allocator(), tenant);
    kvq::LayerCache& lc = s.layers[layer];
    const kvq::Result r = lc.Plan(in.position, in.num_tokens, alloc, &planned[i].plan);
    if (!r.ok()) {
      if (alloc.quota_hit()) {
        QuotaRejected();
        out[i].status = absl::ResourceExhaustedError(absl::StrCat(
            "tenant '", tenant.name(), "' byte quota of ", tenant.quota().max_bytes, " bytes reached (", r.message, ")"));
      } else if (r.code == kvq::Code::kResourceExhausted) {
        out[i].status = absl::ResourceExhaustedError(absl::StrCat("page pool exhausted: ", r.message));
      } else {
        out[i].status = FromResult(r);
      }
      continue;
    }
    const int64_t reserve = std::max<int64_t>(0, new_len - s.tokens);
    if (!tenant.TryAddTokens(reserve)) {
      kvq::LayerCache::Abort(&planned[i].plan, alloc);
      QuotaRejected();
      out[i].status = absl::ResourceExhaustedError(absl::StrCat("tenant '", tenant.name(), "' token quota of ",
                                                                tenant.quota().max_tokens, " tokens reached"));
      continue;
    }
    planned[i].token_reserve = reserve;
    planned[i].active = true;
    if (options_.flush_after)  // on failure (pool, quota) its work flushes nothing: the next step flushes
      planned[i].flush_planned = lc.PlanFlushAfter(planned[i].plan, alloc, &planned[i].flush).ok();
  }

  // 4. One backend call per model shape (one in the usual case: a worker serves one model).
  using ShapeKey = std::tuple<int32_t, int, int, float>;
  std::map<ShapeKey, std::vector<int>> groups;
  for (int i = 0; i < n; ++i) {
    if (!planned[i].active) continue;
    const SessionSpec& sp = sess[i]->spec;
    groups[ShapeKey(sp.num_q_heads, sp.cache.num_kv_heads, sp.cache.head_dim, sp.softmax_scale)].push_back(i);
  }
  std::vector<uint8_t> qbuf, kbuf, vbuf, obuf;
  std::vector<kvq::SeqWork> works, flushes;
  std::vector<kvq::QuantConfig> configs;
  for (auto& [key, members] : groups) {
    const SessionSpec& sp = sess[members[0]]->spec;
    const size_t q_row_bytes = size_t(sp.num_q_heads) * sp.cache.head_dim * 2;
    const size_t kv_row_bytes = size_t(sp.cache.num_kv_heads) * sp.cache.head_dim * 2;
    int64_t rows = 0;
    for (int i : members) rows += inputs[i].num_tokens;
    qbuf.resize(rows * q_row_bytes);
    kbuf.resize(rows * kv_row_bytes);
    vbuf.resize(rows * kv_row_bytes);
    obuf.resize(rows * q_row_bytes);
    works.clear();
    flushes.clear();
    configs.clear();
    int64_t row = 0;
    for (int i : members) {
      const AttendInput& in = inputs[i];
      std::memcpy(qbuf.data() + row * q_row_bytes, in.q.data(), in.q.size());
      std::memcpy(kbuf.data() + row * kv_row_bytes, in.k.data(), in.k.size());
      std::memcpy(vbuf.data() + row * kv_row_bytes, in.v.data(), in.v.size());
      kvq::SeqWork w = planned[i].plan.work;
      w.kv_row = row;
      w.q_row = row;
      works.push_back(w);
      flushes.push_back(planned[i].flush.work);
      configs.push_back(sess[i]->spec.cache.config);
      row += in.num_tokens;
    }
    kvq::StepParams p;
    p.num_q_heads = sp.num_q_heads;
    p.num_kv_heads = sp.cache.num_kv_heads;
    p.head_dim = sp.cache.head_dim;
    p.dtype = dtype;
    p.softmax_scale = sp.softmax_scale;
    p.q = qbuf.data();
    p.k_new = kbuf.data();
    p.v_new = vbuf.data();
    p.o = obuf.data();
    const auto t0 = std::chrono::steady_clock::now();
    bool flushed = false;
    const absl::Status st = backend_->RunStep(p, works.data(), configs.data(), static_cast<int>(works.size()),
                                              options_.flush_after ? flushes.data() : nullptr, &flushed);
    summary.kernel_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    // 5. Commit (or abort the whole group when the backend failed).
    row = 0;
    for (int i : members) {
      Session& s = *sess[i];
      const AttendInput& in = inputs[i];
      TenantAllocator alloc(backend_->allocator(), tenant);
      if (!st.ok()) {
        kvq::LayerCache::Abort(&planned[i].plan, alloc);
        kvq::LayerCache::Abort(&planned[i].flush, alloc);
        tenant.AddTokens(-planned[i].token_reserve);
        out[i].status = Prefixed(st, "backend " + backend_->name() + ": ");
      } else {
        kvq::LayerCache& lc = s.layers[layer];
        lc.Commit(&planned[i].plan, alloc);
        if (planned[i].flush_planned && flushed) lc.CommitFlushAfter(&planned[i].flush);
        else kvq::LayerCache::Abort(&planned[i].flush, alloc);  // not run: the next step flushes
        const int64_t old_tokens = s.tokens;
        Resettle(s);
        tenant.AddTokens((s.tokens - old_tokens) - planned[i].token_reserve);
        out[i].o->assign(reinterpret_cast<const char*>(obuf.data()) + row * q_row_bytes, in.q.size());
        out[i].length = lc.length();
        summary.ok_entries += 1;
        summary.tokens += in.num_tokens;
      }
      row += in.num_tokens;
    }
  }
  return summary;
}

StoreStats Store::Stats() const {
  StoreStats st;
  st.sessions = num_sessions_.load();
  st.tokens = tokens_.load();
  st.bytes.codes = codes_.load();
  st.bytes.scales = scales_.load();
  st.bytes.full_precision = full_precision_.load();
  st.bytes.metadata = metadata_.load();
  st.fp16_equivalent_bytes = fp16_equiv_.load();
  st.pool_capacity = backend_->pool_capacity();
  st.pool_used = backend_->pool_used();
  return st;
}

}  // namespace kvq::store
