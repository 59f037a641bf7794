// A Hugging Face checkpoint folder: config.json plus the weights, either in
// one model.safetensors or in shards listed by model.safetensors.index.json.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/safetensors.h"

namespace pollen {

// A checkpoint folder opened for loading tensors by name.
//
// Open reads config.json and the shard index ("weight_map": tensor name ->
// shard file). A shard is mapped only when a tensor in it is first loaded,
// and then cached, so a node can load its blocks from a folder that lacks the
// shards it does not need. A single-file checkpoint has no index, so Open
// reads the header of model.safetensors instead.
//
// Thread-safe: the configuration and index are immutable after Open, and the
// shard cache is guarded by a mutex.
class Checkpoint {
 public:
  // Returns NOT_FOUND when `dir` or its config.json is missing, or when both
  // model.safetensors and model.safetensors.index.json are. Returns
  // INVALID_ARGUMENT when config.json or the index is malformed.
  static absl::StatusOr<std::shared_ptr<const Checkpoint>> Open(
      const std::string& dir);

  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }

  bool HasTensor(const std::string& name) const;

  // All tensor names of the checkpoint, sorted.
  std::vector<std::string> TensorNames() const;

  // Loads one tensor as a contiguous copy converted to `dtype` on `device`.
  // Returns NOT_FOUND when the tensor or its shard file is missing. Returns
  // INVALID_ARGUMENT, naming the tensor, file and both shapes, when
  // `expected_shape` is non-empty and differs from the stored shape.
  absl::StatusOr<at::Tensor> LoadTensor(
      const std::string& name, at::ScalarType dtype, const at::Device& device,
      const std::vector<int64_t>& expected_shape = {}) const;

 private:
  Checkpoint(std::string dir, ModelConfig config,
             std::map<std::string, std::string> weight_map);

  // Returns the mapped shard `file_name`, opening it on first use.
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> OpenShard(
      const std::string& file_name) const;

  // Set once in Open.
  const std::string dir_;
  const ModelConfig config_;
  const std::map<std::string, std::string> weight_map_;  // name -> shard file

  mutable std::mutex mu_;
  // Shard file name -> mapped file. Guarded by mu_.
  mutable std::map<std::string, std::shared_ptr<const SafetensorsFile>>
      shards_;
};

}  // namespace pollen
