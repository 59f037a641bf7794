// Reading and writing the safetensors format.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of
// JSON header, then the data section. The header maps each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end)}, with offsets relative to
// the start of the data section, and may hold string pairs under
// "__metadata__".
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace pollen {

// Element types Pollen reads. Files with other dtypes (I64, F64, BOOL, ...)
// are rejected when opened.
enum class SafetensorsDtype { kF32, kF16, kBF16 };

// One tensor of a safetensors header. [begin, end) are byte offsets into the
// data section.
struct SafetensorsEntry {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

// A safetensors file mapped into memory. Immutable after Open, so thread-safe.
// The mapping lives as long as this object or any tensor returned by Get.
class SafetensorsFile {
 public:
  // Maps the file and validates the whole header. Returns NOT_FOUND when the
  // file does not exist. Returns INVALID_ARGUMENT, naming the file, tensor
  // and numbers, when the header is malformed, a dtype is unsupported, or a
  // tensor's byte range lies outside the data section or does not match its
  // shape.
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(
      const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }

  // Names in sorted order.
  std::vector<std::string> TensorNames() const;

  // Returns nullptr when the file has no tensor `name`.
  const SafetensorsEntry* Find(const std::string& name) const;

  // String pairs stored under "__metadata__", empty when absent.
  const std::map<std::string, std::string>& metadata() const {
    return metadata_;
  }

  // Returns a zero-copy CPU view of the tensor in its file dtype, which keeps
  // the mapping alive, or NOT_FOUND when the tensor is absent. The mapping is
  // read-only, so writing to the view faults; copy it first.
  // NOTE: a tensor whose bytes are not aligned to its element size comes
  // back as an aligned copy instead of a view.
  absl::StatusOr<at::Tensor> Get(const std::string& name) const;

 private:
  struct Mapping;

  SafetensorsFile(std::string path, std::shared_ptr<const Mapping> mapping);

  std::string path_;
  std::shared_ptr<const Mapping> mapping_;
  const uint8_t* data_section_ = nullptr;  // first byte after the header
  uint64_t data_section_bytes_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes `tensors` (float32, float16 or bfloat16, on any device) as one
// safetensors file, names sorted, with optional string `metadata` stored
// under "__metadata__". Returns INVALID_ARGUMENT for another dtype or a
// repeated name, and INTERNAL when the file cannot be written.
absl::Status WriteSafetensors(
    const std::string& path,
    const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// The dtype's name as the safetensors header spells it ("F32", "F16", "BF16").
const char* SafetensorsDtypeName(SafetensorsDtype dtype);

}  // namespace pollen
