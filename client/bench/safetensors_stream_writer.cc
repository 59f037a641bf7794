#include "client/bench/safetensors_stream_writer.h"

#include <cerrno>
#include <cstring>
#include <set>
#include <utility>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

// The format stores little-endian values, written here without swapping.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors writing assumes a little-endian host");

namespace pollen::bench {
namespace {

at::ScalarType ToScalarType(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF32:
      return at::kFloat;
    case SafetensorsDtype::kF16:
      return at::kHalf;
    case SafetensorsDtype::kBF16:
      return at::kBFloat16;
  }
  return at::kFloat;
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

int64_t TensorSpec::ByteSize() const {
  int64_t elements = 1;
  for (const int64_t size : shape) elements *= size;
  return elements * (dtype == SafetensorsDtype::kF32 ? 4 : 2);
}

SafetensorsStreamWriter::SafetensorsStreamWriter(std::string path,
                                                 std::vector<TensorSpec> specs,
                                                 std::ofstream file)
    : path_(std::move(path)), specs_(std::move(specs)), file_(std::move(file)) {}

absl::StatusOr<std::unique_ptr<SafetensorsStreamWriter>>
SafetensorsStreamWriter::Create(
    const std::string& path, std::vector<TensorSpec> specs,
    const std::map<std::string, std::string>& metadata) {
  // Header: offsets follow the order of `specs`. The JSON object lists the
  // names sorted, which the format allows.
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  int64_t offset = 0;
  for (const TensorSpec& spec : specs) {
    if (spec.name == "__metadata__" || !names.insert(spec.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor name '", spec.name, "' is repeated or reserved in ", path));
    }
    const int64_t bytes = spec.ByteSize();
    header[spec.name] = {{"dtype", SafetensorsDtypeName(spec.dtype)},
                         {"shape", spec.shape},
                         {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  // Spaces pad the header so that the data section starts 8-aligned.
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_bytes = header_text.size();

  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) {
    return absl::InternalError(absl::StrCat("creating ", path, " failed: ",
                                            std::strerror(errno)));
  }
  file.write(reinterpret_cast<const char*>(&header_bytes), sizeof(header_bytes));
  file.write(header_text.data(), static_cast<std::streamsize>(header_bytes));
  if (!file) {
    return absl::InternalError(
        absl::StrCat("writing the header of ", path, " failed"));
  }
  return std::unique_ptr<SafetensorsStreamWriter>(
      new SafetensorsStreamWriter(path, std::move(specs), std::move(file)));
}

const TensorSpec* SafetensorsStreamWriter::next() const {
  return written_ < specs_.size() ? &specs_[written_] : nullptr;
}

absl::Status SafetensorsStreamWriter::Append(const at::Tensor& tensor) {
  const TensorSpec* spec = next();
  if (spec == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "all ", specs_.size(), " tensors of ", path_, " are written already"));
  }
  const at::ScalarType dtype = ToScalarType(spec->dtype);
  if (!tensor.device().is_cpu() || tensor.scalar_type() != dtype ||
      tensor.sizes() != at::IntArrayRef(spec->shape)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", spec->name, "' of ", path_, " must be ",
        c10::toString(dtype), " ", ShapeString(spec->shape), " on the CPU; got ",
        c10::toString(tensor.scalar_type()), " ", ShapeString(tensor.sizes()),
        " on ", tensor.device().str()));
  }

  const at::Tensor contiguous = tensor.contiguous();
  file_.write(static_cast<const char*>(contiguous.data_ptr()),
              static_cast<std::streamsize>(contiguous.nbytes()));
  if (!file_) {
    return absl::InternalError(absl::StrCat("writing tensor '", spec->name,
                                            "' to ", path_, " failed: ",
                                            std::strerror(errno)));
  }
  ++written_;
  return absl::OkStatus();
}

absl::Status SafetensorsStreamWriter::Finish() {
  if (next() != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        path_, " is missing ", specs_.size() - written_, " of its ",
        specs_.size(), " tensors, starting with '", next()->name, "'"));
  }
  file_.close();
  if (!file_) {
    return absl::InternalError(absl::StrCat("closing ", path_, " failed"));
  }
  return absl::OkStatus();
}

}  // namespace pollen::bench
