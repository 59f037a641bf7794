#include "common/tensor_codec.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/activation_compression.h"
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

// Dtype, shape and byte sizes of a checked Tensor message.
struct ProtoLayout {
  at::ScalarType scalar_type;
  std::vector<int64_t> shape;
  int64_t bytes = 0;       // of the decoded tensor
  int64_t data_bytes = 0;  // of proto.data(), as the compression encodes it
};

absl::StatusOr<ProtoLayout> CheckLayout(const v1::Tensor& proto,
                                        const std::string& what) {
  const absl::Status known = CheckCompression(proto.compression());
  if (!known.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", known.message()));
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
  ProtoLayout layout;
  layout.scalar_type = *scalar_type;
  layout.shape.assign(proto.shape().begin(), proto.shape().end());
  const int64_t element_size = c10::elementSize(*scalar_type);
  int64_t numel = 1;
  for (const int64_t dim : layout.shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has negative dimension in shape [",
          absl::StrJoin(layout.shape, ", "), "]"));
    }
    if (dim != 0 && numel > kMaxTensorBytes / element_size / dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " shape [", absl::StrJoin(layout.shape, ", "),
          "] exceeds the limit of ", kMaxTensorBytes, " bytes"));
    }
    numel *= dim;
  }
  layout.bytes = numel * element_size;
  layout.data_bytes = layout.bytes;
  if (proto.compression() != v1::COMPRESSION_NONE) {
    POLLEN_ASSIGN_OR_RETURN(layout.data_bytes,
                            CompressedBytes(proto.compression(), numel));
  }
  if (static_cast<int64_t>(proto.data().size()) != layout.data_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " has ", proto.data().size(), " data bytes, but shape [",
        absl::StrJoin(layout.shape, ", "), "] of ",
        c10::toString(*scalar_type), " with compression ",
        CompressionName(proto.compression()), " needs ", layout.data_bytes));
  }
  return layout;
}

}  // namespace

absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& proto,
                                           const std::string& what) {
  POLLEN_ASSIGN_OR_RETURN(const ProtoLayout layout, CheckLayout(proto, what));
  if (proto.compression() != v1::COMPRESSION_NONE) {
    absl::StatusOr<at::Tensor> decoded;
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("decoding ", what), [&] {
          decoded = DecodeActivations(
              absl::string_view(proto.data().data(), proto.data().size()),
              proto.compression(), layout.shape, layout.scalar_type, what);
          return decoded.status();
        }));
    return decoded;
  }
  at::Tensor tensor =
      at::empty(layout.shape, at::TensorOptions().dtype(layout.scalar_type));
  if (layout.bytes > 0) {
    std::memcpy(tensor.data_ptr(), proto.data().data(), layout.bytes);
  }
  return tensor;
}

absl::StatusOr<at::Tensor> TensorViewFromProto(const v1::Tensor& proto,
                                               const std::string& what) {
  POLLEN_ASSIGN_OR_RETURN(const ProtoLayout layout, CheckLayout(proto, what));
  if (proto.compression() != v1::COMPRESSION_NONE) {
    return TensorFromProto(proto, what);
  }
  const char* data = proto.data().data();
  const size_t alignment = c10::elementSize(layout.scalar_type);
  if (layout.bytes == 0 ||
      reinterpret_cast<uintptr_t>(data) % alignment != 0) {
    return TensorFromProto(proto, what);
  }
  // from_blob takes a mutable pointer; the contract above forbids writes.
  return at::from_blob(const_cast<char*>(data), layout.shape,
                       at::TensorOptions().dtype(layout.scalar_type));
}

absl::Status TensorToProto(const at::Tensor& tensor, v1::Tensor* proto,
                           v1::Compression compression) {
  POLLEN_ASSIGN_OR_RETURN(const v1::DType dtype,
                          ProtoFromScalarType(tensor.scalar_type()));
  proto->Clear();
  proto->set_dtype(dtype);
  for (const int64_t dim : tensor.sizes()) proto->add_shape(dim);
  const size_t bytes = tensor.numel() * tensor.element_size();
  std::string* data = proto->mutable_data();
  if (compression != v1::COMPRESSION_NONE) {
    proto->set_compression(compression);
    return EncodeActivations(tensor, compression, data);
  }

  // A contiguous CPU tensor is copied as it is. Others are copied element
  // by element straight into the message, which also moves them off their
  // device, without an intermediate contiguous CPU tensor.
  if (tensor.is_cpu() && tensor.is_contiguous()) {
    data->assign(static_cast<const char*>(tensor.data_ptr()), bytes);
    return absl::OkStatus();
  }
  data->resize(bytes);
  if (bytes > 0) {
    at::from_blob(data->data(), tensor.sizes(),
                  at::TensorOptions().dtype(tensor.scalar_type()))
        .copy_(tensor);
  }
  return absl::OkStatus();
}

}  // namespace pollen
