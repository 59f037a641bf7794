#include <iostream>

#include "client/cli/commands.h"

namespace pollen::cli {

int RunNodeCommand(const node::NodeOptions& options) {
  const absl::Status status = node::RunNode(options);
  if (!status.ok()) {
    // The process ends here, so the reason goes out as the CLI's other
    // commands print theirs, not as a log line.
    std::cerr << "error: node failed: " << status.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace pollen::cli
