#include <iostream>

#include "client/cli/commands.h"
#include "common/logging.h"

namespace pollen::cli {

int RunNodeCommand(const node::NodeOptions& options) {
  const absl::Status status = node::RunNode(options);
  if (!status.ok()) {
    POLLEN_LOG_ERROR("node failed: {}", std::string(status.message()));
    return 1;
  }
  return 0;
}

}  // namespace pollen::cli
