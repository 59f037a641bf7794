// pollen-simulate: runs Pollen's and Petals' placement policies and Pollen's
// routing over a synthetic churning swarm and reports balance, coverage,
// route latency and moves.
//
// Example:
//   build/pollen-simulate --model llama3.1-405b --nodes 1000 --svg b.svg

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "scheduler/simulator/report.h"
#include "scheduler/simulator/simulator.h"

ABSL_FLAG(std::string, model, "llama2-70b",
          "Model the swarm serves: llama2-70b or llama3.1-405b");
ABSL_FLAG(int, nodes, 100, "Nodes in the swarm after the warm-up");
ABSL_FLAG(double, hours, 24, "Simulated hours, in one-minute ticks");
ABSL_FLAG(double, churn_per_hour, 0.1,
          "Expected fraction of nodes leaving per hour, with as many joining");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the swarm, the policies and the noise");
ABSL_FLAG(std::string, policy, "both", "Policy to run: pollen, petals or both");
ABSL_FLAG(std::string, csv, "", "File to write per-minute results to as CSV");
ABSL_FLAG(bool, json, false,
          "Print the options and summaries as JSON instead of a table");
ABSL_FLAG(std::string, svg, "",
          "File to write a chart of min block throughput / upper bound to");
ABSL_FLAG(int, warmup_minutes, 30, "Minutes over which the initial nodes join");
ABSL_FLAG(int, settle_minutes, 60,
          "Minutes left out of the summaries' averages");
ABSL_FLAG(double, check_period_minutes, 5,
          "Minutes between a node's placement checks");
ABSL_FLAG(double, announce_delay_s, 5,
          "Seconds before a node's new span is visible to other nodes");
ABSL_FLAG(double, load_gb_per_s, 0.5,
          "Speed at which a node loads new blocks, in GB/s");
ABSL_FLAG(double, min_gain, 1.2,
          "Pollen: factor by which a move must raise the minimum block "
          "throughput");
ABSL_FLAG(double, join_jitter, 0.05,
          "Pollen: top fraction of the range of start scores within which a "
          "joining node picks its start at random (ChooseSpanStart jitter)");
ABSL_FLAG(double, balance_quality, 0.75, "Petals: balance_quality");
ABSL_FLAG(int, route_period_minutes, 10, "Minutes between route measurements");
ABSL_FLAG(double, rtt_noise, 0.2,
          "Standard deviation of the log of each measured RTT's error");
ABSL_FLAG(int, announced_next_rtts, 8,
          "RTTs each node announces to nodes serving the block after its span");
ABSL_FLAG(int, client_region, 0,
          "Client's region: 0 na-east, 1 na-central, 2 na-west, 3 europe, "
          "4 asia");

namespace pollen::scheduler {
namespace {

// absl flags take underscores; accept --churn-per-hour as well.
std::vector<char*> UnderscoreFlagNames(int argc, char** argv,
                                       std::vector<std::string>& storage) {
  storage.assign(argv, argv + argc);
  for (size_t i = 1; i < storage.size(); ++i) {
    std::string& arg = storage[i];
    if (arg == "--") break;
    if (arg.rfind("--", 0) != 0) continue;
    const size_t name_end = std::min(arg.find('='), arg.size());
    for (size_t j = 2; j < name_end; ++j) {
      if (arg[j] == '-') arg[j] = '_';
    }
  }
  std::vector<char*> pointers;
  for (std::string& arg : storage) pointers.push_back(arg.data());
  return pointers;
}

absl::StatusOr<SimulationOptions> OptionsFromFlags() {
  SimulationOptions options;
  absl::StatusOr<SimulatedModel> model =
      FindSimulatedModel(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return model.status();
  options.model = *model;
  options.nodes = absl::GetFlag(FLAGS_nodes);
  options.hours = absl::GetFlag(FLAGS_hours);
  options.churn_per_hour = absl::GetFlag(FLAGS_churn_per_hour);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.warmup_minutes = absl::GetFlag(FLAGS_warmup_minutes);
  options.settle_minutes = absl::GetFlag(FLAGS_settle_minutes);
  options.check_period_minutes = absl::GetFlag(FLAGS_check_period_minutes);
  options.announce_delay_s = absl::GetFlag(FLAGS_announce_delay_s);
  options.load_gb_per_s = absl::GetFlag(FLAGS_load_gb_per_s);
  options.pollen_min_gain = absl::GetFlag(FLAGS_min_gain);
  options.pollen_join_jitter = absl::GetFlag(FLAGS_join_jitter);
  options.petals_balance_quality = absl::GetFlag(FLAGS_balance_quality);
  options.route_period_minutes = absl::GetFlag(FLAGS_route_period_minutes);
  options.rtt_noise = absl::GetFlag(FLAGS_rtt_noise);
  options.announced_next_rtts = absl::GetFlag(FLAGS_announced_next_rtts);
  options.client_region = absl::GetFlag(FLAGS_client_region);
  return options;
}

absl::StatusOr<std::vector<PlacementPolicy>> PoliciesFromFlag() {
  const std::string name = absl::GetFlag(FLAGS_policy);
  if (name == "both") {
    return std::vector<PlacementPolicy>{PlacementPolicy::kPollen,
                                        PlacementPolicy::kPetals};
  }
  absl::StatusOr<PlacementPolicy> policy = ParsePolicy(name);
  if (!policy.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--policy is '", name, "'; expected pollen, petals or both"));
  }
  return std::vector<PlacementPolicy>{*policy};
}

// Runs each policy on its own thread; runs share nothing.
absl::StatusOr<std::vector<SimulationResult>> RunPolicies(
    const SimulationOptions& options,
    const std::vector<PlacementPolicy>& policies) {
  std::vector<absl::StatusOr<SimulationResult>> outcomes(
      policies.size(), absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < policies.size(); ++i) {
    threads.emplace_back(
        [&, i] { outcomes[i] = RunSimulation(options, policies[i]); });
  }
  for (std::thread& thread : threads) thread.join();

  std::vector<SimulationResult> results;
  for (absl::StatusOr<SimulationResult>& outcome : outcomes) {
    if (!outcome.ok()) return outcome.status();
    results.push_back(std::move(*outcome));
  }
  return results;
}

nlohmann::json SummaryJson(const SimulationSummary& s) {
  return {
      {"mean_coverage", s.mean_coverage},
      {"min_coverage", s.min_coverage},
      {"gap_minutes", s.gap_minutes},
      {"first_full_coverage_minute", s.first_full_coverage_minute},
      {"mean_min_throughput", s.mean_min_throughput},
      {"mean_upper_bound", s.mean_upper_bound},
      {"mean_balance", s.mean_balance},
      {"lowest_balance", s.lowest_balance},
      {"route_samples", s.route_samples},
      {"mean_route_ms", s.mean_route_ms},
      {"mean_optimal_ms", s.mean_optimal_ms},
      {"mean_fewest_hops_ms", s.mean_fewest_hops_ms},
      {"mean_route_hops", s.mean_route_hops},
      {"moves", s.moves},
      {"moves_per_node_hour", s.moves_per_node_hour},
      {"joins", s.joins},
      {"leaves", s.leaves},
  };
}

nlohmann::json OptionsJson(const SimulationOptions& o) {
  return {
      {"model", o.model.name},
      {"num_blocks", o.model.num_blocks},
      {"nodes", o.nodes},
      {"hours", o.hours},
      {"churn_per_hour", o.churn_per_hour},
      {"seed", o.seed},
      {"warmup_minutes", o.warmup_minutes},
      {"settle_minutes", o.settle_minutes},
      {"check_period_minutes", o.check_period_minutes},
      {"announce_delay_s", o.announce_delay_s},
      {"load_gb_per_s", o.load_gb_per_s},
      {"min_gain", o.pollen_min_gain},
      {"join_jitter", o.pollen_join_jitter},
      {"balance_quality", o.petals_balance_quality},
      {"route_period_minutes", o.route_period_minutes},
      {"rtt_noise", o.rtt_noise},
      {"announced_next_rtts", o.announced_next_rtts},
      {"client_region", o.client_region},
  };
}

absl::Status WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << contents;
  file.close();
  if (!file) {
    return absl::UnavailableError(absl::StrCat("failed to write ", path));
  }
  return absl::OkStatus();
}

absl::Status Run() {
  absl::StatusOr<SimulationOptions> options = OptionsFromFlags();
  if (!options.ok()) return options.status();
  absl::StatusOr<std::vector<PlacementPolicy>> policies = PoliciesFromFlag();
  if (!policies.ok()) return policies.status();

  const auto started = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<SimulationResult>> results =
      RunPolicies(*options, *policies);
  if (!results.ok()) return results.status();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
          .count();

  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json json = {{"options", OptionsJson(*options)},
                           {"results", nlohmann::json::array()}};
    for (const SimulationResult& result : *results) {
      json["results"].push_back({{"policy", PolicyName(result.policy)},
                                 {"summary", SummaryJson(result.summary)}});
    }
    std::printf("%s\n", json.dump(2).c_str());
  } else {
    std::printf("%s, %d nodes, %g h, churn %g/h, seed %llu\n",
                options->model.name.c_str(), options->nodes, options->hours,
                options->churn_per_hour,
                static_cast<unsigned long long>(options->seed));
    std::printf("%s", FormatSummaryTable(*results).c_str());
  }
  std::fflush(stdout);
  std::fprintf(stderr, "simulated in %.1f s\n", seconds);

  if (const std::string path = absl::GetFlag(FLAGS_csv); !path.empty()) {
    if (absl::Status status = WriteFile(path, FormatTicksCsv(*results));
        !status.ok()) {
      return status;
    }
  }
  if (const std::string path = absl::GetFlag(FLAGS_svg); !path.empty()) {
    const std::string title = absl::StrCat(
        options->model.name, ", ", options->nodes, " nodes, churn ",
        options->churn_per_hour * 100, "%/h, seed ", options->seed);
    if (absl::Status status =
            WriteFile(path, RenderBalanceSvg(*results, title));
        !status.ok()) {
      return status;
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace pollen::scheduler

int main(int argc, char** argv) {
  // --help lists the flags of files named after the binary, which this file
  // is not.
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "simulate_main.");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(
      "Simulates block placement and routing over a synthetic swarm.\n"
      "Usage: pollen-simulate [--model llama2-70b|llama3.1-405b] [--nodes N] "
      "[--hours H] [--policy pollen|petals|both] [--csv FILE] [--svg FILE] "
      "[--json]");
  std::vector<std::string> storage;
  std::vector<char*> args =
      pollen::scheduler::UnderscoreFlagNames(argc, argv, storage);
  absl::ParseCommandLine(static_cast<int>(args.size()), args.data());

  const absl::Status status = pollen::scheduler::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "pollen-simulate: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
