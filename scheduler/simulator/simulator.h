// A swarm-scale simulator that runs the real placement and routing code over
// a synthetic, churning swarm, with no networking.
//
// Time advances in one-minute ticks. Nodes with heterogeneous memory,
// throughput and location join and leave. Each picks its blocks with the
// policy under test when it joins, and re-checks its placement periodically
// with that policy's move rule. A node that picks new blocks serves nothing
// until it has loaded them. Every tick records block coverage, the minimum
// block throughput against the even-spread upper bound, and moves. Every few
// ticks a client routes through the swarm with FindFastestRoute using noisy
// RTT measurements, and the simulator compares the route's true latency
// with the optimum.
//
// Both policies see the same nodes, join and leave times and check times for
// a given seed, so their results differ only by their decisions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pollen::scheduler {

enum class PlacementPolicy {
  kPollen,  // ChooseSpanStart on join, DecideMove on checks
  kPetals,  // PetalsChooseBestStart on join, PetalsDecideMove on checks
};

std::string PolicyName(PlacementPolicy policy);

// Returns the policy named "pollen" or "petals", or INVALID_ARGUMENT.
absl::StatusOr<PlacementPolicy> ParsePolicy(absl::string_view name);

// The model whose blocks the swarm serves.
struct SimulatedModel {
  std::string name;
  int num_blocks = 0;
  int64_t block_bytes = 0;  // fp16 weights of one block
  // Key and value cache bytes of one token in one block.
  int64_t kv_bytes_per_token = 0;
};

// Returns "llama2-70b" (80 blocks of about 1.7 GB) or "llama3.1-405b" (126
// blocks of about 6.5 GB), or INVALID_ARGUMENT listing the known names.
absl::StatusOr<SimulatedModel> FindSimulatedModel(absl::string_view name);

struct SimulationOptions {
  SimulatedModel model;
  // Nodes in the swarm once the initial nodes have joined; churn keeps the
  // expected count there.
  int nodes = 100;
  double hours = 24;
  // Expected fraction of the nodes that leave per hour, with as many joining.
  // Leaves and joins are Poisson, starting after the warm-up.
  double churn_per_hour = 0.1;
  uint64_t seed = 1;

  // The initial nodes join at uniformly random times in the first
  // warmup_minutes. Summaries skip the first settle_minutes.
  int warmup_minutes = 30;
  int settle_minutes = 60;

  // Minutes between a node's placement checks, at a random phase per node.
  double check_period_minutes = 5;
  // Seconds before a node's new span is visible to other nodes' decisions.
  // Decisions made closer together than this cannot see each other.
  double announce_delay_s = 5;
  // Speed at which a node loads blocks it does not already hold, in GB/s.
  double load_gb_per_s = 0.5;

  // Pollen's hysteresis (DecideMove min_gain) and join jitter.
  double pollen_min_gain = 1.2;
  double pollen_join_jitter = 0.05;
  // Petals' balance_quality.
  double petals_balance_quality = 0.75;

  // Minutes between route measurements.
  int route_period_minutes = 10;
  // Standard deviation of the log of the measurement error of each RTT the
  // client and the nodes report.
  double rtt_noise = 0.2;
  // RTTs a node announces to nodes serving the block after its span.
  int announced_next_rtts = 8;
  // Region of the client: 0 North America east, 1 North America central,
  // 2 North America west, 3 Europe, 4 Asia.
  int client_region = 0;
  // KV cache tokens each node holds, and the tokens a session reserves.
  int64_t cache_tokens = 16384;
  int64_t session_tokens = 2048;
};

// Swarm state at the end of one minute.
struct TickStats {
  int minute = 0;
  int nodes_present = 0;  // joined and not left, loading or serving
  int nodes_serving = 0;
  double coverage = 0;  // fraction of blocks some serving node covers
  // Minimum over blocks of the summed throughput of serving nodes, in decode
  // steps per second.
  double min_throughput = 0;
  // Sum over present nodes of throughput * span length / num_blocks: the
  // minimum if all capacity were spread evenly.
  double upper_bound = 0;
  int moves = 0;  // placement moves decided this minute
  // Route measurements, on minutes that are multiples of
  // route_period_minutes with full coverage only.
  bool routed = false;
  double route_ms = 0;        // true latency of the route found with noise
  double optimal_ms = 0;      // true latency of the best route
  double fewest_hops_ms = 0;  // true latency of FindFewestHopsRoute
  int route_hops = 0;
};

// Averages over the minutes from settle_minutes on.
struct SimulationSummary {
  double mean_coverage = 0;
  double min_coverage = 0;
  // Minutes in which some block had no serving node.
  int gap_minutes = 0;
  // First minute with every block served, or -1.
  int first_full_coverage_minute = -1;
  double mean_min_throughput = 0;
  double mean_upper_bound = 0;
  // Mean and lowest of min_throughput / upper_bound.
  double mean_balance = 0;
  double lowest_balance = 0;
  int route_samples = 0;
  double mean_route_ms = 0;
  double mean_optimal_ms = 0;
  double mean_fewest_hops_ms = 0;
  double mean_route_hops = 0;
  int64_t moves = 0;  // over the whole run
  double moves_per_node_hour = 0;
  int64_t joins = 0;
  int64_t leaves = 0;
};

struct SimulationResult {
  PlacementPolicy policy = PlacementPolicy::kPollen;
  std::vector<TickStats> ticks;
  SimulationSummary summary;
};

// Runs one policy over the swarm that `options` and its seed describe.
// Returns INVALID_ARGUMENT naming the first option out of range.
absl::StatusOr<SimulationResult> RunSimulation(const SimulationOptions& options,
                                               PlacementPolicy policy);

}  // namespace pollen::scheduler
