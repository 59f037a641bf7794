// `pollen bench`: local against swarm speed of one model, side by side.
#include <iostream>

#include "client/bench/bench_report.h"
#include "client/bench/bench_runner.h"
#include "client/cli/child_process.h"
#include "client/cli/commands.h"
#include "common/checkpoint.h"

namespace pollen::cli {

int RunBenchCommand(const BenchCommandOptions& options) {
  // The nodes run this same executable unless pollen_binary names another.
  bench::BenchOptions bench_options = options.bench;
  if (bench_options.pollen_binary.empty()) {
    bench_options.pollen_binary = SelfExecutablePath();
  }

  // Flags that do not fit the model: exit code 2.
  auto checkpoint = Checkpoint::Open(bench_options.model_dir);
  if (!checkpoint.ok()) {
    std::cerr << "error: " << checkpoint.status().message() << "\n";
    return 1;
  }
  const absl::Status valid =
      bench::ValidateBenchOptions(bench_options, (*checkpoint)->config());
  if (!valid.ok()) {
    std::cerr << "error: " << valid.message() << "\n";
    return 2;
  }
  checkpoint->reset();

  auto result = bench::RunBench(bench_options);
  if (!result.ok()) {
    std::cerr << "error: " << result.status().message() << "\n";
    return 1;
  }
  if (options.json) {
    std::cout << bench::BenchResultToJson(*result).dump() << "\n";
  } else {
    std::cout << bench::FormatBenchReport(*result);
  }
  if (!result->tokens_match) {
    std::cerr << "error: the swarm's greedy tokens differ from the local "
                 "ones: "
              << result->mismatch << "\n";
    return 1;
  }
  return 0;
}

}  // namespace pollen::cli
