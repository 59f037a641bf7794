#include "common/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#include "common/logging.h"
#include "common/status_util.h"

namespace pollen {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

constexpr char kSingleFileName[] = "model.safetensors";
constexpr char kIndexFileName[] = "model.safetensors.index.json";

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool FileExists(const fs::path& path) {
  std::error_code error;
  return fs::is_regular_file(path, error);
}

// Reads the index's weight_map. Shard names must stay inside the checkpoint
// folder.
absl::StatusOr<std::map<std::string, std::string>> ReadIndex(
    const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard index ", path, " could not be opened"));
  }
  std::stringstream text;
  text << file.rdbuf();
  const Json index = Json::parse(text.str(), /*cb=*/nullptr,
                                 /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard index ", path, " is not a JSON object"));
  }
  const auto weight_map = index.find("weight_map");
  if (weight_map == index.end() || !weight_map->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shard index ", path, " has no 'weight_map' object"));
  }

  std::map<std::string, std::string> result;
  for (const auto& [name, file_name] : weight_map->items()) {
    if (!file_name.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat("shard index ", path, " maps tensor '", name,
                       "' to ", file_name.dump(), ", not a file name"));
    }
    const std::string shard = file_name.get<std::string>();
    const fs::path shard_path(shard);
    bool escapes = shard.empty() || shard_path.is_absolute();
    for (const fs::path& part : shard_path) escapes = escapes || part == "..";
    if (escapes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shard index ", path, " maps tensor '", name, "' to '", shard,
          "', which is not a relative path inside the checkpoint folder"));
    }
    result.emplace(name, shard);
  }
  return result;
}

}  // namespace

Checkpoint::Checkpoint(std::string dir, ModelConfig config,
                       std::map<std::string, std::string> weight_map)
    : dir_(std::move(dir)),
      config_(std::move(config)),
      weight_map_(std::move(weight_map)) {}

absl::StatusOr<std::shared_ptr<const Checkpoint>> Checkpoint::Open(
    const std::string& dir) {
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint folder ", dir, " not found"));
  }
  POLLEN_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));

  // A single model.safetensors takes precedence over an index.
  const fs::path single_file = fs::path(dir) / kSingleFileName;
  const fs::path index_file = fs::path(dir) / kIndexFileName;
  std::map<std::string, std::string> weight_map;
  std::shared_ptr<const SafetensorsFile> opened_single_file;
  if (FileExists(single_file)) {
    POLLEN_ASSIGN_OR_RETURN(opened_single_file,
                            SafetensorsFile::Open(single_file.string()));
    for (const std::string& name : opened_single_file->TensorNames()) {
      weight_map.emplace(name, kSingleFileName);
    }
  } else if (FileExists(index_file)) {
    POLLEN_ASSIGN_OR_RETURN(weight_map, ReadIndex(index_file.string()));
  } else {
    return absl::NotFoundError(absl::StrCat("checkpoint folder ", dir,
                                            " has neither ", kSingleFileName,
                                            " nor ", kIndexFileName));
  }

  std::shared_ptr<Checkpoint> checkpoint(
      new Checkpoint(dir, std::move(config), std::move(weight_map)));
  if (opened_single_file != nullptr) {
    checkpoint->shards_.emplace(kSingleFileName, std::move(opened_single_file));
  }
  POLLEN_LOG_DEBUG("Opened checkpoint {} with {} tensors", dir,
                   checkpoint->weight_map_.size());
  return std::shared_ptr<const Checkpoint>(std::move(checkpoint));
}

bool Checkpoint::HasTensor(const std::string& name) const {
  return weight_map_.count(name) != 0;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(weight_map_.size());
  for (const auto& [name, file] : weight_map_) names.push_back(name);
  return names;
}

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Checkpoint::OpenShard(
    const std::string& file_name) const {
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = shards_.find(file_name);
  if (it != shards_.end()) return it->second;

  // Opening maps the file and parses only its header, so holding the lock
  // here is brief.
  POLLEN_ASSIGN_OR_RETURN(
      std::shared_ptr<const SafetensorsFile> shard,
      SafetensorsFile::Open((fs::path(dir_) / file_name).string()));
  shards_.emplace(file_name, shard);
  return shard;
}

absl::StatusOr<at::Tensor> Checkpoint::LoadTensor(
    const std::string& name, at::ScalarType dtype, const at::Device& device,
    const std::vector<int64_t>& expected_shape) const {
  // Find the shard.
  const auto it = weight_map_.find(name);
  if (it == weight_map_.end()) {
    return absl::NotFoundError(absl::StrCat(
        "tensor '", name, "' not found in checkpoint ", dir_, " (",
        weight_map_.size(), " tensors)"));
  }
  auto shard = OpenShard(it->second);
  if (!shard.ok()) {
    return absl::Status(
        shard.status().code(),
        absl::StrCat("loading tensor '", name, "': ", shard.status().message()));
  }

  // Check the stored shape before copying anything.
  POLLEN_ASSIGN_OR_RETURN(const at::Tensor stored, (*shard)->Get(name));
  if (!expected_shape.empty() && stored.sizes() != at::IntArrayRef(expected_shape)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "' in ", (*shard)->path(), " has shape ",
        ShapeString(stored.sizes()), ", expected ",
        ShapeString(expected_shape)));
  }

  // Copy, converting dtype and device in one step.
  at::Tensor result;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("loading tensor '", name, "' ", ShapeString(stored.sizes()),
                   " from ", (*shard)->path(), " as ", c10::toString(dtype),
                   " on ", device.str()),
      [&] {
        result = stored.to(device, dtype, /*non_blocking=*/false,
                           /*copy=*/true, at::MemoryFormat::Contiguous);
        return absl::OkStatus();
      }));
  return result;
}

}  // namespace pollen
