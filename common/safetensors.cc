#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#include "common/status_util.h"

// The format stores little-endian values, and both the reader and the writer
// copy them without byte swapping.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors I/O assumes a little-endian host");

namespace pollen {

using Json = nlohmann::json;

namespace {

constexpr uint64_t kHeaderLengthBytes = 8;
// A header lists only names, shapes and offsets, so a length beyond this
// means the file is corrupt or not a safetensors file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool ParseDtype(const std::string& name, SafetensorsDtype* dtype) {
  if (name == "F32") {
    *dtype = SafetensorsDtype::kF32;
  } else if (name == "F16") {
    *dtype = SafetensorsDtype::kF16;
  } else if (name == "BF16") {
    *dtype = SafetensorsDtype::kBF16;
  } else {
    return false;
  }
  return true;
}

uint64_t ElementBytes(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::kF32 ? 4 : 2;
}

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

bool FromScalarType(at::ScalarType type, SafetensorsDtype* dtype) {
  if (type == at::kFloat) {
    *dtype = SafetensorsDtype::kF32;
  } else if (type == at::kHalf) {
    *dtype = SafetensorsDtype::kF16;
  } else if (type == at::kBFloat16) {
    *dtype = SafetensorsDtype::kBF16;
  } else {
    return false;
  }
  return true;
}

absl::Status HeaderError(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("invalid safetensors file ", path, ": ", what));
}

// Parses one header entry and checks it against the data section.
absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& path,
                                            const std::string& name,
                                            const Json& value,
                                            uint64_t data_section_bytes) {
  const std::string tensor = absl::StrCat("tensor '", name, "'");
  if (!value.is_object()) {
    return HeaderError(path, absl::StrCat(tensor, " must map to an object"));
  }
  SafetensorsEntry entry;
  entry.name = name;

  // dtype.
  const auto dtype = value.find("dtype");
  if (dtype == value.end() || !dtype->is_string()) {
    return HeaderError(path, absl::StrCat(tensor, " has no string 'dtype'"));
  }
  if (!ParseDtype(dtype->get<std::string>(), &entry.dtype)) {
    return HeaderError(
        path, absl::StrCat(tensor, " has dtype ", dtype->get<std::string>(),
                           ", which is not supported (F32, F16, BF16)"));
  }

  // shape, with an overflow-checked element count.
  const auto shape = value.find("shape");
  if (shape == value.end() || !shape->is_array()) {
    return HeaderError(path, absl::StrCat(tensor, " has no array 'shape'"));
  }
  uint64_t numel = 1;
  bool overflow = false;
  for (const Json& dim : *shape) {
    if (!dim.is_number_unsigned() ||
        dim.get<uint64_t>() >
            static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return HeaderError(
          path, absl::StrCat(tensor, " has an invalid shape ", shape->dump(),
                             "; dimensions must be non-negative integers"));
    }
    const uint64_t size = dim.get<uint64_t>();
    entry.shape.push_back(static_cast<int64_t>(size));
    overflow = overflow || __builtin_mul_overflow(numel, size, &numel);
  }
  uint64_t expected_bytes = 0;
  overflow = overflow || __builtin_mul_overflow(
                             numel, ElementBytes(entry.dtype), &expected_bytes);
  if (overflow) {
    return HeaderError(path, absl::StrCat(tensor, " shape ", shape->dump(),
                                          " overflows the element count"));
  }

  // data_offsets.
  const auto offsets = value.find("data_offsets");
  if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() ||
      !(*offsets)[1].is_number_unsigned()) {
    return HeaderError(
        path, absl::StrCat(tensor,
                           " needs 'data_offsets' as two non-negative "
                           "integers [begin, end)"));
  }
  entry.begin = (*offsets)[0].get<uint64_t>();
  entry.end = (*offsets)[1].get<uint64_t>();
  if (entry.begin > entry.end) {
    return HeaderError(path,
                       absl::StrCat(tensor, " data_offsets [", entry.begin,
                                    ", ", entry.end, ") have begin > end"));
  }
  if (entry.end > data_section_bytes) {
    return HeaderError(
        path, absl::StrCat(tensor, " data_offsets [", entry.begin, ", ",
                           entry.end, ") exceed the data section of ",
                           data_section_bytes, " bytes"));
  }
  if (entry.end - entry.begin != expected_bytes) {
    return HeaderError(
        path,
        absl::StrCat(tensor, " data_offsets [", entry.begin, ", ", entry.end,
                     ") span ", entry.end - entry.begin, " bytes, but shape ",
                     ShapeString(entry.shape), " of ",
                     dtype->get<std::string>(), " needs ", expected_bytes));
  }
  return entry;
}

absl::StatusOr<std::map<std::string, std::string>> ParseMetadata(
    const std::string& path, const Json& value) {
  if (!value.is_object()) {
    return HeaderError(path, "'__metadata__' must be an object of strings");
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      return HeaderError(path, absl::StrCat("'__metadata__' value for '", key,
                                            "' must be a string, got ",
                                            item.dump()));
    }
    metadata[key] = item.get<std::string>();
  }
  return metadata;
}

}  // namespace

// A read-only mmap of a whole file, unmapped on destruction.
struct SafetensorsFile::Mapping {
  void* address = nullptr;
  size_t bytes = 0;

  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (address != nullptr) munmap(address, bytes);
  }
};

const char* SafetensorsDtypeName(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF32:
      return "F32";
    case SafetensorsDtype::kF16:
      return "F16";
    case SafetensorsDtype::kBF16:
      return "BF16";
  }
  return "unknown";
}

SafetensorsFile::SafetensorsFile(std::string path,
                                 std::shared_ptr<const Mapping> mapping)
    : path_(std::move(path)), mapping_(std::move(mapping)) {}

SafetensorsFile::~SafetensorsFile() = default;

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  // Map the file.
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    if (error == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat("safetensors file ", path, " not found"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors file ", path, " could not be opened: ",
        std::strerror(error)));
  }
  struct stat info {};
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors file ", path, " is not a regular file"));
  }
  const uint64_t file_bytes = static_cast<uint64_t>(info.st_size);
  if (file_bytes < kHeaderLengthBytes) {
    close(fd);
    return HeaderError(path, absl::StrCat("file has ", file_bytes,
                                          " bytes, fewer than the 8-byte "
                                          "header length"));
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->bytes = file_bytes;
  mapping->address = mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  const int mmap_error = errno;
  close(fd);
  if (mapping->address == MAP_FAILED) {
    mapping->address = nullptr;
    return absl::InternalError(absl::StrCat("mmap of ", path, " (", file_bytes,
                                            " bytes) failed: ",
                                            std::strerror(mmap_error)));
  }
  const auto* bytes = static_cast<const uint8_t*>(mapping->address);

  // Header length.
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, bytes, kHeaderLengthBytes);
  if (header_bytes > file_bytes - kHeaderLengthBytes) {
    return HeaderError(path,
                       absl::StrCat("header length ", header_bytes,
                                    " exceeds the ",
                                    file_bytes - kHeaderLengthBytes,
                                    " bytes after the length field"));
  }
  if (header_bytes > kMaxHeaderBytes) {
    return HeaderError(path, absl::StrCat("header length ", header_bytes,
                                          " exceeds the maximum of ",
                                          kMaxHeaderBytes, " bytes"));
  }

  // Header JSON.
  const char* header_begin =
      reinterpret_cast<const char*>(bytes + kHeaderLengthBytes);
  const Json header = Json::parse(header_begin, header_begin + header_bytes,
                                  /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) {
    return HeaderError(path, "header is not valid JSON");
  }
  if (!header.is_object()) {
    return HeaderError(path, absl::StrCat("header must be a JSON object, got ",
                                          header.type_name()));
  }

  // Entries.
  std::shared_ptr<SafetensorsFile> file(
      new SafetensorsFile(path, std::move(mapping)));
  file->data_section_ = bytes + kHeaderLengthBytes + header_bytes;
  file->data_section_bytes_ = file_bytes - kHeaderLengthBytes - header_bytes;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      POLLEN_ASSIGN_OR_RETURN(file->metadata_, ParseMetadata(path, value));
      continue;
    }
    POLLEN_ASSIGN_OR_RETURN(
        SafetensorsEntry entry,
        ParseEntry(path, name, value, file->data_section_bytes_));
    file->entries_.emplace(name, std::move(entry));
  }
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

std::vector<std::string> SafetensorsFile::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  return names;
}

const SafetensorsEntry* SafetensorsFile::Find(const std::string& name) const {
  const auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

absl::StatusOr<at::Tensor> SafetensorsFile::Get(const std::string& name) const {
  const SafetensorsEntry* entry = Find(name);
  if (entry == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", name, "' not found in ", path_));
  }

  at::Tensor result;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("reading tensor '", name, "' from ", path_), [&] {
        const auto options = at::TensorOptions()
                                 .dtype(ToScalarType(entry->dtype))
                                 .device(at::kCPU);
        // from_blob takes a mutable pointer, but the pages are mapped
        // read-only.
        void* data = const_cast<uint8_t*>(data_section_ + entry->begin);
        std::shared_ptr<const Mapping> keep_alive = mapping_;
        result = at::from_blob(
            data, entry->shape,
            [keep_alive](void*) mutable { keep_alive.reset(); }, options);
        if (reinterpret_cast<uintptr_t>(data) % ElementBytes(entry->dtype) !=
            0) {
          result = result.clone();
        }
        return absl::OkStatus();
      }));
  return result;
}

absl::Status WriteSafetensors(
    const std::string& path,
    const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata) {
  // Sort by name and bring every tensor to contiguous CPU memory.
  std::map<std::string, at::Tensor> sorted;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot write a tensor named '__metadata__' to ", path));
    }
    SafetensorsDtype dtype;
    if (!FromScalarType(tensor.scalar_type(), &dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "' has dtype ", c10::toString(tensor.scalar_type()),
          "; only float32, float16 and bfloat16 can be written to ", path));
    }
    at::Tensor host;
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("copying tensor '", name, "' to the CPU"), [&] {
          host = tensor.to(at::kCPU).contiguous();
          return absl::OkStatus();
        }));
    if (!sorted.emplace(name, std::move(host)).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "' appears twice in the list for ", path));
    }
  }

  // Header, padded with spaces so that the data section starts 8-aligned.
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : sorted) {
    SafetensorsDtype dtype = SafetensorsDtype::kF32;
    FromScalarType(tensor.scalar_type(), &dtype);
    const uint64_t bytes = tensor.nbytes();
    header[name] = {{"dtype", SafetensorsDtypeName(dtype)},
                    {"shape", tensor.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_bytes = header_text.size();

  // File.
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) {
    return absl::InternalError(absl::StrCat("creating ", path, " failed: ",
                                            std::strerror(errno)));
  }
  file.write(reinterpret_cast<const char*>(&header_bytes), kHeaderLengthBytes);
  file.write(header_text.data(), static_cast<std::streamsize>(header_bytes));
  for (const auto& [name, tensor] : sorted) {
    file.write(static_cast<const char*>(tensor.data_ptr()),
               static_cast<std::streamsize>(tensor.nbytes()));
  }
  file.close();
  if (!file) {
    return absl::InternalError(
        absl::StrCat("writing ", offset + header_bytes + kHeaderLengthBytes,
                     " bytes to ", path, " failed"));
  }
  return absl::OkStatus();
}

}  // namespace pollen
