#include "common/tensor_codec.h"

#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_util.h"

namespace pollen {
namespace {

constexpr int kMaxDims = 8;

absl::StatusOr<at::ScalarType> ScalarTypeFromProto(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return at::kFloat;
    case v1::DTYPE_FLOAT16:
      return at::kHalf;
    case v1::DTYPE_BFLOAT16:
      return at::kBFloat16;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "unsupported tensor dtype ", v1::DType_Name(dtype), " (",
          static_cast<int>(dtype), "); expected FLOAT32, FLOAT16 or BFLOAT16"));
  }
}

absl::StatusOr<v1::DType> ProtoFromScalarType(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return v1::DTYPE_FLOAT32;
    case at::kHalf:
      return v1::DTYPE_FLOAT16;
    case at::kBFloat16:
      return v1::DTYPE_BFLOAT16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("cannot send tensor of dtype ", c10::toString(type),
                       "; expected float32, float16 or bfloat16"));
  }
}

}  // namespace

absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& proto,
                                           const std::string& what) {
  if (proto.compression() != v1::COMPRESSION_NONE) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": unsupported compression ",
                     static_cast<int>(proto.compression())));
  }
  auto scalar_type = ScalarTypeFromProto(proto.dtype());
  if (!scalar_type.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", scalar_type.status().message()));
  }
  if (proto.shape_size() > kMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", proto.shape_size(),
                     " dimensions; the limit is ", kMaxDims));
  }

  // Multiply with an overflow check: a hostile shape must not wrap around
  // to a small element count.
  const int64_t element_size = c10::elementSize(*scalar_type);
  int64_t numel = 1;
  std::vector<int64_t> shape(proto.shape().begin(), proto.shape().end());
  for (const int64_t dim : shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has negative dimension in shape [",
          absl::StrJoin(shape, ", "), "]"));
    }
    if (dim != 0 && numel > kMaxTensorBytes / element_size / dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " shape [", absl::StrJoin(shape, ", "), "] exceeds the limit of ",
          kMaxTensorBytes, " bytes"));
    }
    numel *= dim;
  }
  const int64_t expected_bytes = numel * element_size;
  if (static_cast<int64_t>(proto.data().size()) != expected_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " has ", proto.data().size(), " data bytes, but shape [",
        absl::StrJoin(shape, ", "), "] of ", c10::toString(*scalar_type),
        " needs ", expected_bytes));
  }

  at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(*scalar_type));
  if (expected_bytes > 0) {
    std::memcpy(tensor.data_ptr(), proto.data().data(), expected_bytes);
  }
  return tensor;
}

absl::Status TensorToProto(const at::Tensor& tensor, v1::Tensor* proto) {
  POLLEN_ASSIGN_OR_RETURN(const v1::DType dtype,
                          ProtoFromScalarType(tensor.scalar_type()));
  const at::Tensor host = tensor.to(at::kCPU).contiguous();

  proto->Clear();
  proto->set_dtype(dtype);
  for (const int64_t dim : host.sizes()) proto->add_shape(dim);
  const size_t bytes = host.numel() * host.element_size();
  proto->mutable_data()->assign(static_cast<const char*>(host.data_ptr()),
                                bytes);
  return absl::OkStatus();
}

}  // namespace pollen
