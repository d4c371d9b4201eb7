#include "kvstore/tenants.h"

#include <cctype>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvq::store {

bool Tenant::TryAdd(std::atomic<int64_t>& counter, int64_t delta, int64_t limit) {
  if (delta <= 0 || limit <= 0) {
    counter.fetch_add(delta);
    return true;
  }
  int64_t cur = counter.load();
  do {
    if (cur + delta > limit) return false;
  } while (!counter.compare_exchange_weak(cur, cur + delta));
  return true;
}

bool TenantAllocator::Allocate(int64_t bytes, int64_t* offset) {
  if (!tenant_.TryAddBytes(bytes)) {
    quota_hit_ = true;
    return false;
  }
  if (!pool_.Allocate(bytes, offset)) {
    tenant_.AddBytes(-bytes);
    return false;
  }
  return true;
}

void TenantAllocator::Free(int64_t offset, int64_t bytes) {
  pool_.Free(offset, bytes);
  tenant_.AddBytes(-bytes);
}

TenantRegistry::TenantRegistry() {
  auto t = std::make_shared<Tenant>("default", TenantQuota{});
  by_name_["default"] = t;
}

absl::StatusOr<TenantRegistry> TenantRegistry::Parse(const std::string& text) {
  TenantRegistry reg;
  reg.by_name_.clear();
  reg.auth_required_ = true;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    const size_t hash = line.find('#');
    if (hash != absl::string_view::npos) line = line.substr(0, hash);
    std::vector<absl::string_view> f = absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (f.empty()) continue;
    const std::string where = absl::StrCat("tenants file line ", line_no, ": ");
    if (f.size() != 5)
      return absl::InvalidArgumentError(
          where + "want 5 fields `token tenant max_sessions max_tokens max_bytes`, got " + std::to_string(f.size()));
    const std::string token(f[0]);
    if (token.size() < 8 || token.size() > 512)
      return absl::InvalidArgumentError(where + "token must be 8..512 characters");
    for (char c : token)
      if (!std::isgraph(static_cast<unsigned char>(c)))
        return absl::InvalidArgumentError(where + "token must be printable characters without spaces");
    TenantQuota q;
    int64_t* fields[3] = {&q.max_sessions, &q.max_tokens, &q.max_bytes};
    const char* names[3] = {"max_sessions", "max_tokens", "max_bytes"};
    for (int i = 0; i < 3; ++i)
      if (!absl::SimpleAtoi(f[2 + i], fields[i]) || *fields[i] < 0)
        return absl::InvalidArgumentError(where + names[i] + " must be a non-negative integer, got '" +
                                          std::string(f[2 + i]) + "'");
    if (reg.by_token_.count(token)) return absl::InvalidArgumentError(where + "duplicate token");
    const std::string name(f[1]);
    auto it = reg.by_name_.find(name);
    if (it == reg.by_name_.end()) {
      it = reg.by_name_.emplace(name, std::make_shared<Tenant>(name, q)).first;
    } else {
      const TenantQuota& o = it->second->quota();
      if (o.max_sessions != q.max_sessions || o.max_tokens != q.max_tokens || o.max_bytes != q.max_bytes)
        return absl::InvalidArgumentError(where + "tenant '" + name + "' was given different quotas before");
    }
    reg.by_token_[token] = it->second;
  }
  if (reg.by_token_.empty()) return absl::InvalidArgumentError("tenants file names no tenant");
  return reg;
}

absl::StatusOr<TenantRegistry> TenantRegistry::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read tenants file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  auto reg = Parse(ss.str());
  if (!reg.ok()) return absl::Status(reg.status().code(), path + ": " + std::string(reg.status().message()));
  return reg;
}

absl::StatusOr<Tenant*> TenantRegistry::Authenticate(const std::string* authorization) const {
  if (!auth_required_) return by_name_.begin()->second.get();
  if (authorization == nullptr) return absl::UnauthenticatedError("missing authorization metadata (Bearer token)");
  absl::string_view v(*authorization);
  if (!absl::ConsumePrefix(&v, "Bearer ") && !absl::ConsumePrefix(&v, "bearer "))
    return absl::UnauthenticatedError("authorization metadata must be 'Bearer <token>'");
  auto it = by_token_.find(std::string(absl::StripAsciiWhitespace(v)));
  if (it == by_token_.end()) return absl::UnauthenticatedError("invalid token");
  return it->second.get();
}

std::vector<Tenant*> TenantRegistry::tenants() const {
  std::vector<Tenant*> out;
  for (auto& [name, t] : by_name_) out.push_back(t.get());
  return out;
}

}  // namespace kvq::store
