// Writes a safetensors file one tensor at a time.
//
// WriteSafetensors (common/safetensors.h) takes every tensor of a file at
// once, but generated checkpoints can be larger than memory. This writer
// takes the names, dtypes and shapes first and writes the header. It then
// appends the tensors' bytes in that order, so only the tensor being
// written needs to be in memory.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/safetensors.h"

namespace pollen::bench {

// Name, element type and shape of one tensor of a file.
struct TensorSpec {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;

  // Bytes of the tensor's data.
  int64_t ByteSize() const;
};

// A safetensors file being written. Not thread-safe.
class SafetensorsStreamWriter {
 public:
  // Creates `path` and writes the header for `specs`, whose data then
  // follow in the order of `specs`. `metadata` is stored under
  // "__metadata__". Returns INVALID_ARGUMENT for a repeated or reserved name
  // and INTERNAL when the file cannot be written.
  static absl::StatusOr<std::unique_ptr<SafetensorsStreamWriter>> Create(
      const std::string& path, std::vector<TensorSpec> specs,
      const std::map<std::string, std::string>& metadata = {});

  SafetensorsStreamWriter(const SafetensorsStreamWriter&) = delete;
  SafetensorsStreamWriter& operator=(const SafetensorsStreamWriter&) = delete;

  // Writes the data of the next tensor in order. `tensor` must be a CPU
  // tensor of that spec's dtype and shape (INVALID_ARGUMENT otherwise,
  // naming both), and is made contiguous if it is not. Returns
  // FAILED_PRECONDITION when every tensor is written already.
  absl::Status Append(const at::Tensor& tensor);

  // The spec of the tensor that Append expects next, or nullptr when every
  // tensor is written.
  const TensorSpec* next() const;

  // Flushes and closes the file. Returns FAILED_PRECONDITION when tensors
  // are missing and INTERNAL when writing failed.
  absl::Status Finish();

 private:
  SafetensorsStreamWriter(std::string path, std::vector<TensorSpec> specs,
                          std::ofstream file);

  const std::string path_;
  const std::vector<TensorSpec> specs_;
  std::ofstream file_;
  size_t written_ = 0;  // tensors appended so far
};

}  // namespace pollen::bench
