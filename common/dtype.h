// Names of the tensor dtypes that Pollen blocks run in, as flags spell them.
#pragma once

#include <string>

#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"

namespace pollen {

// Parses a --dtype value: float32 or fp32, float16 or fp16, bfloat16 or
// bf16. Returns INVALID_ARGUMENT naming the value and the accepted names
// otherwise.
absl::StatusOr<at::ScalarType> ParseDtype(const std::string& name);

// "float32", "float16" or "bfloat16"; other types use libtorch's name.
std::string DtypeName(at::ScalarType dtype);

}  // namespace pollen
