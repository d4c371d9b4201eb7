// Tenants: bearer token -> tenant and its quotas, and the per-tenant accounting of sessions, tokens
// and bytes. Without a tenants file there is one tenant ("default", no quotas) and no token is
// required.
//
// Tenants file format (one tenant token per line; '#' starts a comment; blank lines ignored):
//   <token> <tenant> <max_sessions> <max_tokens> <max_bytes>
// Quotas are non-negative integers; 0 means unlimited. Several tokens may name the same tenant
// (they must then give the same quotas). Tokens are 8..512 printable non-space characters.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvq/cache.h"

namespace kvq::store {

struct TenantQuota {
  int64_t max_sessions = 0;  // 0 = unlimited
  int64_t max_tokens = 0;    // sum over the tenant's sessions of each session's length
  int64_t max_bytes = 0;     // pool bytes held by the tenant's sessions
};

class Tenant {
 public:
  Tenant(std::string name, TenantQuota quota) : name_(std::move(name)), quota_(quota) {}
  const std::string& name() const { return name_; }
  const TenantQuota& quota() const { return quota_; }

  int64_t sessions() const { return sessions_.load(); }
  int64_t tokens() const { return tokens_.load(); }
  int64_t bytes() const { return bytes_.load(); }

  // Each Try* adds `delta` only when the result stays within the quota; Release* subtracts.
  bool TryAddSessions(int64_t delta) { return TryAdd(sessions_, delta, quota_.max_sessions); }
  bool TryAddTokens(int64_t delta) { return TryAdd(tokens_, delta, quota_.max_tokens); }
  bool TryAddBytes(int64_t delta) { return TryAdd(bytes_, delta, quota_.max_bytes); }
  void AddTokens(int64_t delta) { tokens_.fetch_add(delta); }  // unchecked (shrinking, settling)
  void AddSessions(int64_t delta) { sessions_.fetch_add(delta); }
  void AddBytes(int64_t delta) { bytes_.fetch_add(delta); }

 private:
  static bool TryAdd(std::atomic<int64_t>& counter, int64_t delta, int64_t limit);

  const std::string name_;
  const TenantQuota quota_;
  std::atomic<int64_t> sessions_{0}, tokens_{0}, bytes_{0};
};

// A page allocator that charges a tenant's byte quota; one per call (it remembers whether the last
// failure was the quota or the pool).
class TenantAllocator final : public kvq::PageAllocator {
 public:
  TenantAllocator(kvq::PageAllocator& pool, Tenant& tenant) : pool_(pool), tenant_(tenant) {}
  bool Allocate(int64_t bytes, int64_t* offset) override;
  void Free(int64_t offset, int64_t bytes) override;
  bool quota_hit() const { return quota_hit_; }

 private:
  kvq::PageAllocator& pool_;
  Tenant& tenant_;
  bool quota_hit_ = false;
};

class TenantRegistry {
 public:
  // One default tenant without quotas; no token needed.
  TenantRegistry();
  // Parses the tenants file text (format above); errors name the line.
  static absl::StatusOr<TenantRegistry> Parse(const std::string& text);
  static absl::StatusOr<TenantRegistry> Load(const std::string& path);

  bool auth_required() const { return auth_required_; }
  // `authorization` is the metadata value ("Bearer <token>"); nullptr value = header missing.
  // UNAUTHENTICATED when auth is required and the token is missing or unknown.
  absl::StatusOr<Tenant*> Authenticate(const std::string* authorization) const;
  std::vector<Tenant*> tenants() const;

 private:
  bool auth_required_ = false;
  std::map<std::string, std::shared_ptr<Tenant>> by_token_;
  std::map<std::string, std::shared_ptr<Tenant>> by_name_;
};

}  // namespace kvq::store
