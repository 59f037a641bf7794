// `pollen make-checkpoint`: a Llama checkpoint with real shapes and random
// weights, for benchmarks.
#include <iostream>
#include <string>

#include "absl/strings/str_format.h"
#include "client/bench/random_checkpoint.h"
#include "client/cli/commands.h"
#include "common/dtype.h"

namespace pollen::cli {
namespace {

// "12.3 MB" below 10^9 bytes, "4.40 GB" above.
std::string FormatBytes(int64_t bytes) {
  return bytes < 1'000'000'000 ? absl::StrFormat("%.1f MB", bytes / 1e6)
                               : absl::StrFormat("%.2f GB", bytes / 1e9);
}

}  // namespace

int RunMakeCheckpointCommand(const MakeCheckpointCommandOptions& options) {
  // Flags: exit code 2 for bad values.
  auto shape = bench::FindCheckpointShape(options.shape);
  if (!shape.ok()) {
    std::cerr << "error: --shape: " << shape.status().message() << "\n";
    return 2;
  }
  auto dtype = ParseDtype(options.dtype);
  if (!dtype.ok()) {
    std::cerr << "error: --dtype: " << dtype.status().message() << "\n";
    return 2;
  }
  if (options.num_layers < 0) {
    std::cerr << "error: --layers must be at least 1 (or 0 for the shape's "
                 "own "
              << shape->num_hidden_layers << "), got " << options.num_layers
              << "\n";
    return 2;
  }
  if (options.out_dir.empty()) {
    std::cerr << "error: pollen make-checkpoint needs --out DIR\n";
    return 2;
  }

  bench::RandomCheckpointOptions write;
  write.shape = *shape;
  write.num_layers = options.num_layers;
  write.dtype = *dtype == at::kBFloat16 ? SafetensorsDtype::kBF16
                : *dtype == at::kHalf   ? SafetensorsDtype::kF16
                                        : SafetensorsDtype::kF32;
  write.out_dir = options.out_dir;
  write.seed = options.seed;
  // Large checkpoints take minutes; report each file on stderr.
  write.on_file_written = [](const std::string& file_name, int64_t done,
                             int64_t total) {
    std::cerr << "wrote " << file_name << " (" << FormatBytes(done) << " of "
              << FormatBytes(total) << ")\n";
  };
  auto summary = bench::WriteRandomCheckpoint(write);
  if (!summary.ok()) {
    std::cerr << "error: " << summary.status().message() << "\n";
    return summary.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }

  std::cout << absl::StrFormat(
      "wrote a random %s checkpoint with %d layers (%s, seed %d) to %s: "
      "%d tensors, %s in %d safetensors file(s)\n",
      shape->name, summary->config.num_hidden_layers, DtypeName(*dtype),
      options.seed, options.out_dir, summary->num_tensors,
      FormatBytes(summary->weight_bytes), summary->weight_files.size());
  return 0;
}

}  // namespace pollen::cli
