// Conversions between absl::Status, grpc::Status and libtorch exceptions.
//
// absl::StatusCode and grpc::StatusCode share the google.rpc.Code numbering,
// so codes convert one to one.
#pragma once

#include <exception>
#include <functional>
#include "absl/strings/string_view.h"

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace pollen {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Runs `fn` and turns any exception it throws (c10::Error from libtorch,
// std::bad_alloc, std::exception) into an INTERNAL or RESOURCE_EXHAUSTED
// status whose message starts with `context`.
absl::Status CatchTorchErrors(absl::string_view context,
                              const std::function<absl::Status()>& fn);

}  // namespace pollen

// Evaluates `expr` (an absl::Status) and returns it from the enclosing
// function when it is not OK.
#define POLLEN_RETURN_IF_ERROR(expr)               \
  do {                                             \
    const ::absl::Status pollen_status_ = (expr);  \
    if (!pollen_status_.ok()) return pollen_status_; \
  } while (false)

#define POLLEN_CONCAT_INNER(a, b) a##b
#define POLLEN_CONCAT(a, b) POLLEN_CONCAT_INNER(a, b)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status,
// otherwise moves the value into `lhs`, which may be a declaration.
#define POLLEN_ASSIGN_OR_RETURN(lhs, rexpr) \
  POLLEN_ASSIGN_OR_RETURN_IMPL(POLLEN_CONCAT(pollen_statusor_, __LINE__), lhs, rexpr)

#define POLLEN_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return statusor.status();            \
  lhs = std::move(statusor).value()
