#include "tests/support/checkpoint_fixtures.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <utility>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

#include "common/model_config.h"
#include "common/safetensors.h"
#include "common/status_util.h"

namespace pollen::testing {

namespace fs = std::filesystem;

absl::StatusOr<std::vector<std::string>> MakeShardedCopy(
    const std::string& src_dir, const std::string& dst_dir) {
  POLLEN_ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(src_dir));
  POLLEN_ASSIGN_OR_RETURN(
      const std::shared_ptr<const SafetensorsFile> source,
      SafetensorsFile::Open((fs::path(src_dir) / "model.safetensors").string()));
  std::error_code error;
  fs::create_directories(dst_dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("creating ", dst_dir, " failed: ",
                                            error.message()));
  }

  // Shard names: one per block, then the one for everything else.
  const int blocks = static_cast<int>(config.num_hidden_layers);
  const int shard_count = blocks + 1;
  std::vector<std::string> shard_names;
  for (int k = 1; k <= shard_count; ++k) {
    shard_names.push_back(absl::StrFormat("model-%05d-of-%05d.safetensors", k,
                                          shard_count));
  }

  // Group tensors by shard: "model.layers.{i}." goes to shard i.
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> groups(
      shard_count);
  nlohmann::json weight_map = nlohmann::json::object();
  uint64_t total_bytes = 0;
  for (const std::string& name : source->TensorNames()) {
    int shard = blocks;
    for (int block = 0; block < blocks; ++block) {
      if (name.rfind(absl::StrCat("model.layers.", block, "."), 0) == 0) {
        shard = block;
        break;
      }
    }
    POLLEN_ASSIGN_OR_RETURN(at::Tensor tensor, source->Get(name));
    total_bytes += tensor.nbytes();
    groups[shard].emplace_back(name, std::move(tensor));
    weight_map[name] = shard_names[shard];
  }

  // Shards, index, and the remaining files.
  for (int shard = 0; shard < shard_count; ++shard) {
    POLLEN_RETURN_IF_ERROR(WriteSafetensors(
        (fs::path(dst_dir) / shard_names[shard]).string(), groups[shard],
        {{"format", "pt"}}));
  }
  const nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}},
                                {"weight_map", weight_map}};
  std::ofstream index_file(fs::path(dst_dir) / "model.safetensors.index.json");
  index_file << index.dump(2) << "\n";
  index_file.close();
  if (!index_file) {
    return absl::InternalError(
        absl::StrCat("writing the shard index in ", dst_dir, " failed"));
  }
  for (const fs::directory_entry& entry : fs::directory_iterator(src_dir)) {
    const std::string file_name = entry.path().filename().string();
    if (!entry.is_regular_file() || entry.path().extension() == ".safetensors" ||
        file_name == "model.safetensors.index.json") {
      continue;
    }
    fs::copy_file(entry.path(), fs::path(dst_dir) / file_name,
                  fs::copy_options::overwrite_existing, error);
    if (error) {
      return absl::InternalError(absl::StrCat("copying ", entry.path().string(),
                                              " failed: ", error.message()));
    }
  }
  return shard_names;
}

}  // namespace pollen::testing
