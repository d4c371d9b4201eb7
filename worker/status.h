// Small status helpers for the worker (Debian's Abseil has no ASSIGN_OR_RETURN).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVQ_CONCAT_INNER_(a, b) a##b
#define KVQ_CONCAT_(a, b) KVQ_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define KVQ_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::absl::Status _kvq_st = (expr);           \
    if (!_kvq_st.ok()) return _kvq_st;         \
  } while (0)

#define KVQ_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()

// `lhs = value of expr`, or returns its error status.
#define KVQ_ASSIGN_OR_RETURN(lhs, expr) \
  KVQ_ASSIGN_OR_RETURN_IMPL_(KVQ_CONCAT_(_kvq_sor_, __LINE__), lhs, expr)
