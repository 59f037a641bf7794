#include "common/model_id.h"

#include <filesystem>

namespace pollen {

std::string DefaultModelId(const std::string& model_dir) {
  std::filesystem::path path(model_dir);
  std::error_code error;
  const std::filesystem::path canonical =
      std::filesystem::weakly_canonical(path, error);
  if (!error) path = canonical;
  // A trailing slash leaves an empty filename, so the parent has the name.
  if (path.filename().empty()) path = path.parent_path();
  return path.filename().string();
}

}  // namespace pollen
