#include "scheduler/simulator/simulator.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <unordered_map>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "scheduler/latency_route.h"
#include "scheduler/petals_policy.h"
#include "scheduler/placement.h"
#include "scheduler/route.h"
#include "scheduler/simulator/synthetic_swarm.h"

namespace pollen::scheduler {
namespace {

constexpr double kNever = std::numeric_limits<double>::infinity();

// Seeds of the policy's and the measurements' generators, derived from the
// run's seed so that they differ from the swarm's own stream.
constexpr uint64_t kPolicySeedSalt = 0x9e3779b97f4a7c15ULL;
constexpr uint64_t kMeasureSeedSalt = 0xc2b2ae3d27d4eb4fULL;

absl::Status CheckOptions(const SimulationOptions& options) {
  const auto invalid = [](absl::string_view name, double value,
                          absl::string_view limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "simulation option ", name, " is ", value, "; it must be ", limit));
  };

  // The model.
  if (options.model.num_blocks <= 0) {
    return invalid("model.num_blocks", options.model.num_blocks, "positive");
  }
  if (options.model.block_bytes <= 0) {
    return invalid("model.block_bytes", options.model.block_bytes, "positive");
  }
  if (options.model.kv_bytes_per_token < 0) {
    return invalid("model.kv_bytes_per_token", options.model.kv_bytes_per_token,
                   "0 or more");
  }

  // The swarm and its churn.
  if (options.nodes < 1 || options.nodes > 100000) {
    return invalid("nodes", options.nodes, "in [1, 100000]");
  }
  if (!(options.hours > 0 && options.hours <= 24 * 365)) {
    return invalid("hours", options.hours, "in (0, 8760]");
  }
  if (!(options.churn_per_hour >= 0 && options.churn_per_hour <= 60)) {
    return invalid("churn_per_hour", options.churn_per_hour, "in [0, 60]");
  }
  if (options.warmup_minutes < 0) {
    return invalid("warmup_minutes", options.warmup_minutes, "0 or more");
  }
  if (options.settle_minutes < 0) {
    return invalid("settle_minutes", options.settle_minutes, "0 or more");
  }

  // Timing of placement decisions.
  if (!(options.check_period_minutes > 0)) {
    return invalid("check_period_minutes", options.check_period_minutes,
                   "positive");
  }
  if (!(options.announce_delay_s >= 0)) {
    return invalid("announce_delay_s", options.announce_delay_s, "0 or more");
  }
  if (!(options.load_gb_per_s > 0)) {
    return invalid("load_gb_per_s", options.load_gb_per_s, "positive");
  }

  // Policy parameters.
  if (!(options.pollen_min_gain > 0)) {
    return invalid("pollen_min_gain", options.pollen_min_gain, "positive");
  }
  if (!(options.pollen_join_jitter >= 0 && options.pollen_join_jitter <= 1)) {
    return invalid("pollen_join_jitter", options.pollen_join_jitter,
                   "in [0, 1]");
  }
  if (!(options.petals_balance_quality > 0)) {
    return invalid("petals_balance_quality", options.petals_balance_quality,
                   "positive");
  }

  // Route measurements.
  if (options.route_period_minutes < 1) {
    return invalid("route_period_minutes", options.route_period_minutes,
                   "1 or more");
  }
  if (!(options.rtt_noise >= 0)) {
    return invalid("rtt_noise", options.rtt_noise, "0 or more");
  }
  if (options.announced_next_rtts < 0) {
    return invalid("announced_next_rtts", options.announced_next_rtts,
                   "0 or more");
  }
  if (options.client_region < 0 || options.client_region >= kNumRegions) {
    return invalid("client_region", options.client_region,
                   absl::StrCat("in [0, ", kNumRegions - 1, "]"));
  }
  if (options.cache_tokens < 1) {
    return invalid("cache_tokens", options.cache_tokens, "positive");
  }
  if (options.session_tokens < 1 ||
      options.session_tokens > options.cache_tokens) {
    return invalid("session_tokens", options.session_tokens,
                   "in [1, cache_tokens]");
  }
  return absl::OkStatus();
}

// Per-node state of one policy's run.
struct NodeState {
  bool present = false;
  int start = 0;
  double serving_from = kNever;  // minute its current blocks are loaded
  double next_check = kNever;
  // The span other nodes see, which lags `start` by the announce delay.
  bool visible = false;
  int visible_start = 0;
};

// A span change that becomes visible to other nodes at `minute`.
struct Announcement {
  double minute = 0;
  int node = 0;
  int start = 0;
};

// A join or placement check, in time order within a minute.
struct Decision {
  double minute = 0;
  int node = 0;
  bool join = false;
};

// One policy's run over a timeline.
class SwarmRun {
 public:
  SwarmRun(const SimulationOptions& options, const SwarmTimeline& timeline,
           PlacementPolicy policy)
      : options_(options),
        timeline_(timeline),
        policy_(policy),
        num_blocks_(options.model.num_blocks),
        states_(timeline.nodes.size()),
        policy_random_(options.seed ^ kPolicySeedSalt),
        measure_random_(options.seed ^ kMeasureSeedSalt) {}

  SimulationResult Run();

 private:
  void ApplyLeaves(int minute);
  std::vector<Decision> CollectDecisions(int minute);
  void ApplyAnnouncementsUntil(double minute);
  void RefreshView();
  void Join(const Decision& decision);
  void Check(const Decision& decision);
  double LoadMinutes(int new_blocks) const;
  TickStats Measure(int minute);
  void MeasureRoute(const std::vector<int>& serving, TickStats& stats);

  const SimulationOptions& options_;
  const SwarmTimeline& timeline_;
  const PlacementPolicy policy_;
  const int num_blocks_;

  std::vector<NodeState> states_;
  std::vector<int> present_;                // node indices, unordered
  std::deque<Announcement> announcements_;  // by time
  int moves_this_minute_ = 0;

  // What nodes see: visible spans in node order and their block throughputs.
  bool view_stale_ = true;
  std::vector<ServerSpan> view_;
  std::vector<double> view_throughputs_;

  SimulationRandom policy_random_;
  SimulationRandom measure_random_;
};

SimulationResult SwarmRun::Run() {
  SimulationResult result;
  result.policy = policy_;
  const int minutes = static_cast<int>(timeline_.joins_by_minute.size());
  for (int minute = 0; minute < minutes; ++minute) {
    moves_this_minute_ = 0;
    ApplyLeaves(minute);
    for (const Decision& decision : CollectDecisions(minute)) {
      ApplyAnnouncementsUntil(decision.minute);
      RefreshView();
      if (decision.join) {
        Join(decision);
      } else {
        Check(decision);
      }
    }
    result.ticks.push_back(Measure(minute));
  }
  return result;
}

void SwarmRun::ApplyLeaves(int minute) {
  // A leaving node's record disappears at once: clients and nodes notice the
  // failed connection or the expired record.
  for (int node : timeline_.leaves_by_minute[minute]) {
    NodeState& state = states_[node];
    state.present = false;
    state.visible = false;
    state.next_check = kNever;
    const auto it = std::find(present_.begin(), present_.end(), node);
    if (it != present_.end()) present_.erase(it);
    view_stale_ = true;
  }
}

std::vector<Decision> SwarmRun::CollectDecisions(int minute) {
  std::vector<Decision> decisions;
  for (int node : timeline_.joins_by_minute[minute]) {
    decisions.push_back(
        Decision{timeline_.nodes[node].join_minute, node, true});
  }
  for (int node : present_) {
    NodeState& state = states_[node];
    while (state.next_check < minute + 1) {
      // A check that fell in the minute the node joined runs now.
      decisions.push_back(
          Decision{std::max<double>(state.next_check, minute), node, false});
      state.next_check += options_.check_period_minutes;
    }
  }
  std::sort(decisions.begin(), decisions.end(),
            [](const Decision& a, const Decision& b) {
              return std::make_pair(a.minute, a.node) <
                     std::make_pair(b.minute, b.node);
            });
  return decisions;
}

void SwarmRun::ApplyAnnouncementsUntil(double minute) {
  while (!announcements_.empty() && announcements_.front().minute <= minute) {
    const Announcement& announcement = announcements_.front();
    NodeState& state = states_[announcement.node];
    if (state.present) {
      state.visible = true;
      state.visible_start = announcement.start;
      view_stale_ = true;
    }
    announcements_.pop_front();
  }
}

void SwarmRun::RefreshView() {
  if (!view_stale_) return;
  view_.clear();
  std::vector<int> nodes = present_;
  std::sort(nodes.begin(), nodes.end());
  for (int node : nodes) {
    const NodeState& state = states_[node];
    if (!state.visible) continue;
    const NodeProfile& profile = timeline_.nodes[node];
    ServerSpan span;
    span.node_id = profile.node_id;
    span.start = state.visible_start;
    span.end = state.visible_start + profile.length;
    span.throughput = profile.throughput;
    view_.push_back(std::move(span));
  }
  view_throughputs_ = BlockThroughputs(view_, num_blocks_);
  view_stale_ = false;
}

double SwarmRun::LoadMinutes(int new_blocks) const {
  const double seconds =
      new_blocks * (options_.model.block_bytes / 1e9) / options_.load_gb_per_s;
  return seconds / 60;
}

void SwarmRun::Join(const Decision& decision) {
  const NodeProfile& profile = timeline_.nodes[decision.node];
  NodeState& state = states_[decision.node];

  if (policy_ == PlacementPolicy::kPollen) {
    state.start = ChooseSpanStartForThroughputs(
        view_throughputs_, profile.length, profile.throughput,
        policy_random_.engine(), options_.pollen_join_jitter);
  } else {
    state.start = PetalsChooseBestStart(view_throughputs_, profile.length);
  }
  state.present = true;
  state.serving_from = decision.minute + LoadMinutes(profile.length);
  state.next_check = decision.minute + profile.check_phase_minutes;
  present_.push_back(decision.node);
  announcements_.push_back(
      Announcement{decision.minute + options_.announce_delay_s / 60,
                   decision.node, state.start});
}

void SwarmRun::Check(const Decision& decision) {
  const NodeProfile& profile = timeline_.nodes[decision.node];
  NodeState& state = states_[decision.node];
  // Nodes check only while serving, from the span others already see.
  if (state.serving_from > decision.minute || !state.visible ||
      state.visible_start != state.start) {
    return;
  }

  MoveDecision move;
  if (policy_ == PlacementPolicy::kPollen) {
    move = DecideMoveForThroughputs(
        view_throughputs_, state.start, state.start + profile.length,
        profile.throughput, options_.pollen_min_gain, policy_random_.engine());
  } else {
    move = PetalsDecideMoveForThroughputs(
        view_throughputs_, view_, profile.node_id,
        options_.petals_balance_quality, policy_random_.engine());
  }
  if (!move.move || move.new_start == state.start) return;

  // The node keeps the blocks the two spans share and loads the rest, and
  // serves nothing until it has them.
  const int overlap =
      std::max(0, std::min(state.start, move.new_start) + profile.length -
                      std::max(state.start, move.new_start));
  state.start = move.new_start;
  state.serving_from = decision.minute + LoadMinutes(profile.length - overlap);
  announcements_.push_back(
      Announcement{decision.minute + options_.announce_delay_s / 60,
                   decision.node, state.start});
  ++moves_this_minute_;
}

TickStats SwarmRun::Measure(int minute) {
  TickStats stats;
  stats.minute = minute;
  stats.moves = moves_this_minute_;
  const double now = minute + 1;

  std::vector<int> serving;
  std::vector<double> throughputs(num_blocks_, 0.0);
  double capacity = 0;
  std::vector<int> nodes = present_;
  std::sort(nodes.begin(), nodes.end());
  for (int node : nodes) {
    const NodeProfile& profile = timeline_.nodes[node];
    const NodeState& state = states_[node];
    capacity += profile.throughput * profile.length;
    if (state.serving_from > now) continue;
    serving.push_back(node);
    for (int block = state.start; block < state.start + profile.length;
         ++block) {
      throughputs[block] += profile.throughput;
    }
  }

  stats.nodes_present = static_cast<int>(nodes.size());
  stats.nodes_serving = static_cast<int>(serving.size());
  const int covered = static_cast<int>(std::count_if(
      throughputs.begin(), throughputs.end(), [](double t) { return t > 0; }));
  stats.coverage = static_cast<double>(covered) / num_blocks_;
  stats.min_throughput = MinBlockThroughput(throughputs);
  stats.upper_bound = capacity / num_blocks_;

  if (minute % options_.route_period_minutes == 0 && covered == num_blocks_) {
    MeasureRoute(serving, stats);
  }
  return stats;
}

void SwarmRun::MeasureRoute(const std::vector<int>& serving, TickStats& stats) {
  const auto noisy = [this](double rtt_ms) {
    return rtt_ms * std::exp(options_.rtt_noise * measure_random_.Normal());
  };

  // Serving nodes by the blocks they cover, to pick announced next nodes.
  std::vector<std::vector<int>> serving_block(num_blocks_);
  for (size_t i = 0; i < serving.size(); ++i) {
    const int start = states_[serving[i]].start;
    const int length = timeline_.nodes[serving[i]].length;
    for (int block = start; block < start + length; ++block) {
      serving_block[block].push_back(static_cast<int>(i));
    }
  }

  // The true spans and the client's noisy view of them, in the same order.
  // Each node announces RTTs to a random sample of the nodes serving the
  // block after its span.
  std::vector<ServerSpan> truth;
  std::vector<ServerSpan> seen;
  LatencyModel true_model;
  LatencyModel seen_model;
  true_model.tokens_needed = seen_model.tokens_needed = options_.session_tokens;
  for (size_t i = 0; i < serving.size(); ++i) {
    const NodeProfile& profile = timeline_.nodes[serving[i]];
    ServerSpan span;
    span.node_id = profile.node_id;
    span.start = states_[serving[i]].start;
    span.end = span.start + profile.length;
    span.throughput = profile.throughput;
    span.cache_tokens_left = options_.cache_tokens;
    ServerSpan seen_span = span;

    if (span.end < num_blocks_) {
      std::vector<int> next = serving_block[span.end];
      const int count =
          std::min<int>(options_.announced_next_rtts, next.size());
      for (int k = 0; k < count; ++k) {
        const size_t pick = k + measure_random_.Index(next.size() - k);
        std::swap(next[k], next[pick]);
        const NodeProfile& other = timeline_.nodes[serving[next[k]]];
        const double rtt_ms = NodeRttMs(profile, other);
        span.next_rtt_ms[other.node_id] = rtt_ms;
        seen_span.next_rtt_ms[other.node_id] = noisy(rtt_ms);
      }
    }
    const double client_rtt_ms = ClientRttMs(options_.client_region, profile);
    true_model.client_rtt_ms[profile.node_id] = client_rtt_ms;
    seen_model.client_rtt_ms[profile.node_id] = noisy(client_rtt_ms);
    truth.push_back(std::move(span));
    seen.push_back(std::move(seen_span));
  }

  // The route the client picks, priced with the truth, against the optimum
  // and the fewest-hops route.
  std::unordered_map<std::string, int> index_by_id;
  for (size_t i = 0; i < truth.size(); ++i) index_by_id[truth[i].node_id] = i;
  const auto true_latency = [&](const std::vector<RouteHop>& route) {
    std::vector<RouteHop> priced;
    for (const RouteHop& hop : route) {
      priced.push_back(RouteHop{truth[index_by_id.at(hop.server.node_id)],
                                hop.start, hop.end});
    }
    return RouteLatencyMs(priced, true_model);
  };
  const absl::StatusOr<std::vector<RouteHop>> chosen =
      FindFastestRoute(seen, 0, num_blocks_, seen_model);
  const absl::StatusOr<std::vector<RouteHop>> optimal =
      FindFastestRoute(truth, 0, num_blocks_, true_model);
  const absl::StatusOr<std::vector<RouteHop>> fewest =
      FindFewestHopsRoute(truth, 0, num_blocks_);
  if (!chosen.ok() || !optimal.ok() || !fewest.ok()) return;

  stats.routed = true;
  stats.route_ms = true_latency(*chosen);
  stats.optimal_ms = RouteLatencyMs(*optimal, true_model);
  stats.fewest_hops_ms = true_latency(*fewest);
  stats.route_hops = static_cast<int>(chosen->size());
}

SimulationSummary Summarize(const SimulationOptions& options,
                            const SwarmTimeline& timeline,
                            const std::vector<TickStats>& ticks) {
  SimulationSummary summary;
  for (const NodeProfile& node : timeline.nodes) {
    ++summary.joins;
    if (node.leave_minute >= 0) ++summary.leaves;
  }

  int counted = 0;
  double node_minutes = 0;
  summary.min_coverage = 1;
  summary.lowest_balance = kNever;
  for (const TickStats& tick : ticks) {
    summary.moves += tick.moves;
    node_minutes += tick.nodes_present;
    if (summary.first_full_coverage_minute < 0 && tick.coverage >= 1) {
      summary.first_full_coverage_minute = tick.minute;
    }
    if (tick.minute < options.settle_minutes) continue;

    ++counted;
    summary.mean_coverage += tick.coverage;
    summary.min_coverage = std::min(summary.min_coverage, tick.coverage);
    if (tick.coverage < 1) ++summary.gap_minutes;
    summary.mean_min_throughput += tick.min_throughput;
    summary.mean_upper_bound += tick.upper_bound;
    const double balance =
        tick.upper_bound > 0 ? tick.min_throughput / tick.upper_bound : 0;
    summary.mean_balance += balance;
    summary.lowest_balance = std::min(summary.lowest_balance, balance);
    if (tick.routed) {
      ++summary.route_samples;
      summary.mean_route_ms += tick.route_ms;
      summary.mean_optimal_ms += tick.optimal_ms;
      summary.mean_fewest_hops_ms += tick.fewest_hops_ms;
      summary.mean_route_hops += tick.route_hops;
    }
  }

  if (counted > 0) {
    summary.mean_coverage /= counted;
    summary.mean_min_throughput /= counted;
    summary.mean_upper_bound /= counted;
    summary.mean_balance /= counted;
  } else {
    summary.min_coverage = 0;
    summary.lowest_balance = 0;
  }
  if (summary.route_samples > 0) {
    summary.mean_route_ms /= summary.route_samples;
    summary.mean_optimal_ms /= summary.route_samples;
    summary.mean_fewest_hops_ms /= summary.route_samples;
    summary.mean_route_hops /= summary.route_samples;
  }
  if (node_minutes > 0) {
    summary.moves_per_node_hour = summary.moves / (node_minutes / 60);
  }
  return summary;
}

}  // namespace

std::string PolicyName(PlacementPolicy policy) {
  return policy == PlacementPolicy::kPollen ? "pollen" : "petals";
}

absl::StatusOr<PlacementPolicy> ParsePolicy(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "pollen") return PlacementPolicy::kPollen;
  if (lower == "petals") return PlacementPolicy::kPetals;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown placement policy '", name, "'; expected pollen or petals"));
}

absl::StatusOr<SimulatedModel> FindSimulatedModel(absl::string_view name) {
  // Both use grouped-query attention with 8 key/value heads of 128
  // dimensions, so a token's fp16 keys and values take 2 * 8 * 128 * 2 bytes
  // per block.
  constexpr int64_t kKvBytesPerToken = 2 * 8 * 128 * 2;
  if (name == "llama2-70b") {
    return SimulatedModel{"llama2-70b", 80, 1'700'000'000, kKvBytesPerToken};
  }
  if (name == "llama3.1-405b") {
    return SimulatedModel{"llama3.1-405b", 126, 6'500'000'000,
                          kKvBytesPerToken};
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown model '", name, "'; expected llama2-70b or llama3.1-405b"));
}

absl::StatusOr<SimulationResult> RunSimulation(const SimulationOptions& options,
                                               PlacementPolicy policy) {
  if (absl::Status status = CheckOptions(options); !status.ok()) return status;
  const SwarmTimeline timeline = BuildSwarmTimeline(options);
  SimulationResult result = SwarmRun(options, timeline, policy).Run();
  result.summary = Summarize(options, timeline, result.ticks);
  return result;
}

}  // namespace pollen::scheduler
