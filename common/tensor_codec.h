// Conversion between pollen.v1.Tensor messages and at::Tensor.
//
// The wire layout is row-major little-endian elements. Pollen runs only on
// little-endian hosts (x86-64, AArch64), so bytes are copied as they are.
#pragma once

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "pollen/v1/pollen.pb.h"

namespace pollen {

// Largest tensor payload accepted from the wire, in bytes. It bounds the
// memory a single request can make a node allocate.
inline constexpr int64_t kMaxTensorBytes = int64_t{1} << 30;

// Parses `proto` into a CPU tensor that owns its memory, decoding any
// compression back to proto.dtype(). Rejects unknown dtypes or compression,
// negative dimensions, more than 8 dimensions, data whose size does not
// match the shape and compression, and invalid int8 block scales, naming
// `what` in the message.
absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& proto,
                                           const std::string& what);

// Checks `proto` like TensorFromProto, but returns a CPU tensor that shares
// the bytes of proto.data() instead of copying them, so it is valid only
// while `proto` lives and its data is not changed. The caller must not
// write into the tensor. When the bytes are compressed or not aligned for
// the dtype, the result is a decoded copy.
absl::StatusOr<at::Tensor> TensorViewFromProto(const v1::Tensor& proto,
                                               const std::string& what);

// Writes `tensor` (float32, float16 or bfloat16, on any device) into `proto`,
// encoding the data with `compression` (see common/activation_compression.h)
// while proto.dtype() keeps the tensor's dtype. Other dtypes are
// INVALID_ARGUMENT, and so are NaN or infinite values with INT8_BLOCKWISE.
// Reuses the capacity of proto.data(), so a message that is filled again
// and again allocates only when a tensor is larger than all before it.
absl::Status TensorToProto(
    const at::Tensor& tensor, v1::Tensor* proto,
    v1::Compression compression = v1::COMPRESSION_NONE);

}  // namespace pollen
