// Lossy encodings of hidden states and gradients on the wire
// (pollen.v1.Compression): float16, bfloat16 and blockwise int8.
//
// The encoder turns a floating-point tensor into bytes. The decoder checks
// the bytes and returns a tensor of the dtype the sender declared.
// TensorToProto and TensorFromProto in common/tensor_codec.h call them, so
// use those unless you handle raw bytes.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "pollen/v1/pollen.pb.h"

namespace pollen {

// Elements per block of COMPRESSION_INT8_BLOCKWISE. Each block stores one
// float32 scale before the int8 values of all blocks.
inline constexpr int64_t kInt8BlockSize = 64;

// Parses a compression name: none, fp16 (float16), bf16 (bfloat16) or
// int8 (int8_blockwise). INVALID_ARGUMENT lists the accepted names.
absl::StatusOr<v1::Compression> ParseCompression(const std::string& name);

// Returns the short name ParseCompression accepts ("none", "fp16", "bf16",
// "int8"), or "unknown(N)" for a value this build does not know.
std::string CompressionName(v1::Compression compression);

// Returns INVALID_ARGUMENT, naming the value and the known ones, when
// `compression` is not a value of this build's v1::Compression. A proto3
// enum field keeps unknown numbers as they came off the wire.
absl::Status CheckCompression(v1::Compression compression);

// Returns the size in bytes of `numel` elements encoded with `compression`,
// which must be FLOAT16, BFLOAT16 or INT8_BLOCKWISE. Returns
// INVALID_ARGUMENT for NONE or an unknown value, whose size depends on the
// dtype.
absl::StatusOr<int64_t> CompressedBytes(v1::Compression compression,
                                        int64_t numel);

// Encodes the elements of `tensor` (float32, float16 or bfloat16, on any
// device, in row-major order) into `out`, replacing its contents and
// reusing its capacity. INT8_BLOCKWISE rejects NaN and infinite values with
// INVALID_ARGUMENT, because no finite scale can represent them.
absl::Status EncodeActivations(const at::Tensor& tensor,
                               v1::Compression compression, std::string* out);

// Decodes `data`, written by EncodeActivations with `compression`, into a
// new CPU tensor of `shape` and `dtype` (float32, float16 or bfloat16).
// Returns INVALID_ARGUMENT, naming `what`, when the data size does not match
// the shape or an int8 block scale is negative, NaN or infinite.
absl::StatusOr<at::Tensor> DecodeActivations(absl::string_view data,
                                             v1::Compression compression,
                                             at::IntArrayRef shape,
                                             at::ScalarType dtype,
                                             const std::string& what);

}  // namespace pollen
