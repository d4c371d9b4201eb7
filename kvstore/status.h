// Status helpers for the store: tiny macros in the shape of Abseil's internal ones (Debian's Abseil
// 20220623 has no ASSIGN_OR_RETURN) and the one mapping from the compute library's kvq::Code.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvq/cache.h"

#define KVQ_STATUS_CONCAT_INNER(a, b) a##b
#define KVQ_STATUS_CONCAT(a, b) KVQ_STATUS_CONCAT_INNER(a, b)

#define KVQ_RETURN_IF_ERROR(expr)          \
  do {                                     \
    ::absl::Status kvq_status_ = (expr);   \
    if (!kvq_status_.ok()) return kvq_status_; \
  } while (0)

#define KVQ_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

#define KVQ_ASSIGN_OR_RETURN(lhs, expr) \
  KVQ_ASSIGN_OR_RETURN_IMPL(KVQ_STATUS_CONCAT(kvq_statusor_, __LINE__), lhs, expr)

namespace kvq::store {

// kvq::Code (compute library) -> absl::StatusCode: the only place this mapping lives.
inline absl::StatusCode ToAbslCode(kvq::Code code) {
  switch (code) {
    case kvq::Code::kOk: return absl::StatusCode::kOk;
    case kvq::Code::kInvalidArgument: return absl::StatusCode::kInvalidArgument;
    case kvq::Code::kFailedPrecondition: return absl::StatusCode::kFailedPrecondition;
    case kvq::Code::kResourceExhausted: return absl::StatusCode::kResourceExhausted;
    case kvq::Code::kInternal: return absl::StatusCode::kInternal;
  }
  return absl::StatusCode::kInternal;
}

inline absl::Status FromResult(const kvq::Result& r) {
  if (r.ok()) return absl::OkStatus();
  return absl::Status(ToAbslCode(r.code), r.message);
}

}  // namespace kvq::store
