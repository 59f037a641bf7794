#include "scheduler/latency_route.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"

namespace pollen::scheduler {
namespace {

constexpr double kInfinity = std::numeric_limits<double>::infinity();

absl::Status CheckRange(int start, int end) {
  if (start >= end) {
    return absl::InvalidArgumentError(
        absl::StrCat("empty block range [", start, ", ", end, ")"));
  }
  return absl::OkStatus();
}

bool IsUsable(const ServerSpan& span, const RouteOptions& options,
              int64_t min_cache_tokens) {
  return span.start < span.end &&
         options.excluded_nodes.count(span.node_id) == 0 &&
         span.cache_tokens_left >= min_cache_tokens;
}

// Returns the indices of usable spans that overlap [start, end).
std::vector<int> UsableSpans(const std::vector<ServerSpan>& spans, int start,
                             int end, const RouteOptions& options,
                             int64_t min_cache_tokens) {
  std::vector<int> usable;
  for (size_t i = 0; i < spans.size(); ++i) {
    const ServerSpan& span = spans[i];
    if (span.end <= start || span.start >= end) continue;
    if (IsUsable(span, options, min_cache_tokens)) {
      usable.push_back(static_cast<int>(i));
    }
  }
  return usable;
}

// Returns, per block of [start, end), the positions in `usable` of the
// spans covering it. When some block has none, returns RESOURCE_EXHAUSTED
// if every such block has a node left out only for lack of free cache, and
// NOT_FOUND otherwise. A full node frees cache only as its sessions end, so
// waiting for the DHT to show more nodes would not help.
absl::StatusOr<std::vector<std::vector<int>>> CoveringSpans(
    const std::vector<ServerSpan>& spans, const std::vector<int>& usable,
    int start, int end, const RouteOptions& options, int64_t min_cache_tokens) {
  std::vector<std::vector<int>> covering(end - start);
  for (size_t u = 0; u < usable.size(); ++u) {
    const ServerSpan& span = spans[usable[u]];
    const int first = std::max(span.start, start);
    const int last = std::min(span.end, end);
    for (int block = first; block < last; ++block) {
      covering[block - start].push_back(static_cast<int>(u));
    }
  }

  std::vector<int> unserved;
  for (int block = start; block < end; ++block) {
    if (covering[block - start].empty()) unserved.push_back(block);
  }
  if (unserved.empty()) return covering;

  // The largest free cache of a node that serves an unserved block and is
  // usable in every other way, minimised over those blocks, or -1 when some
  // block has no such node.
  int64_t max_cache_left = std::numeric_limits<int64_t>::max();
  for (const int block : unserved) {
    int64_t block_max = -1;
    for (const ServerSpan& span : spans) {
      if (span.start <= block && block < span.end &&
          IsUsable(span, options, /*min_cache_tokens=*/0)) {
        block_max = std::max(block_max, span.cache_tokens_left);
      }
    }
    max_cache_left = std::min(max_cache_left, block_max);
  }
  if (max_cache_left >= 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the nodes serving block", unserved.size() > 1 ? "s " : " ",
        FormatBlockList(unserved), " have too little free KV cache: the "
        "session needs ", min_cache_tokens, " cache tokens, and the node with "
        "the most has ", max_cache_left,
        " left; retry when sessions end, or ask for fewer tokens"));
  }
  return absl::NotFoundError(absl::StrCat(
      "no usable node serves block", unserved.size() > 1 ? "s " : " ",
      FormatBlockList(unserved), " (", usable.size(), " of ", spans.size(),
      " announced spans usable in [", start, ", ", end, "))"));
}

// RTTs that are negative, infinite or NaN count as not measured.
bool IsValidRtt(double rtt_ms) { return std::isfinite(rtt_ms) && rtt_ms >= 0; }

double ClientRttMs(const std::string& node_id, const LatencyModel& model) {
  const auto it = model.client_rtt_ms.find(node_id);
  return it == model.client_rtt_ms.end() || !IsValidRtt(it->second)
             ? model.default_rtt_ms
             : it->second;
}

// Returns the announced RTT from `from` to `to`, or -1 when there is none.
double AnnouncedRttMs(const ServerSpan& from, const std::string& to) {
  const auto it = from.next_rtt_ms.find(to);
  return it == from.next_rtt_ms.end() || !IsValidRtt(it->second) ? -1
                                                                 : it->second;
}

double StepMsPerBlock(const ServerSpan& span, const LatencyModel& model) {
  const double throughput =
      span.throughput > 0 && std::isfinite(span.throughput)
          ? span.throughput
          : model.default_throughput;
  return 1000.0 / throughput;
}

absl::Status CheckModel(const LatencyModel& model) {
  if (!(model.default_throughput > 0 &&
        std::isfinite(model.default_throughput))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LatencyModel.default_throughput is ", model.default_throughput,
        "; it must be positive and finite"));
  }
  if (!IsValidRtt(model.default_rtt_ms)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LatencyModel.default_rtt_ms is ", model.default_rtt_ms,
                     "; it must be 0 or more and finite"));
  }
  if (!IsValidRtt(model.low_cache_penalty_ms)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LatencyModel.low_cache_penalty_ms is ", model.low_cache_penalty_ms,
        "; it must be 0 or more and finite"));
  }
  return absl::OkStatus();
}

bool HasLowCache(const ServerSpan& span, const LatencyModel& model) {
  // cache < 2 * tokens_needed, written so that it cannot overflow.
  return span.cache_tokens_left - model.tokens_needed < model.tokens_needed;
}

// Per-span costs of FindFastestRoute, with spans named by their position in
// the usable list.
struct SpanCosts {
  double step_ms = 0;         // compute per block
  double enter_ms = 0;        // return leg plus the low-cache penalty
  double client_half_ms = 0;  // forward leg when no RTT is announced
  // Announced forward legs to other usable spans, sorted by position.
  std::vector<std::pair<int, double>> links;
};

std::vector<SpanCosts> ComputeSpanCosts(const std::vector<ServerSpan>& spans,
                                        const std::vector<int>& usable,
                                        const LatencyModel& model) {
  std::unordered_map<std::string, std::vector<int>> positions_by_id;
  for (size_t u = 0; u < usable.size(); ++u) {
    positions_by_id[spans[usable[u]].node_id].push_back(static_cast<int>(u));
  }

  std::vector<SpanCosts> costs(usable.size());
  for (size_t u = 0; u < usable.size(); ++u) {
    const ServerSpan& span = spans[usable[u]];
    SpanCosts& cost = costs[u];
    cost.step_ms = StepMsPerBlock(span, model);
    cost.client_half_ms = ClientRttMs(span.node_id, model) / 2;
    cost.enter_ms = cost.client_half_ms +
                    (HasLowCache(span, model) ? model.low_cache_penalty_ms : 0);
    for (const auto& [next_id, rtt_ms] : span.next_rtt_ms) {
      if (!IsValidRtt(rtt_ms)) continue;
      const auto it = positions_by_id.find(next_id);
      if (it == positions_by_id.end()) continue;
      for (int position : it->second) {
        if (position != static_cast<int>(u)) {
          cost.links.emplace_back(position, rtt_ms / 2);
        }
      }
    }
    std::sort(cost.links.begin(), cost.links.end());
  }
  return costs;
}

bool HasLink(const SpanCosts& from, int to) {
  const auto it = std::lower_bound(from.links.begin(), from.links.end(),
                                   std::make_pair(to, -kInfinity));
  return it != from.links.end() && it->first == to;
}

// A search state: the hop on usable span `span` ends at this layer's block
// boundary. `previous` is the span that ran the block before, -1 for the
// client.
struct State {
  int span = -1;
  double cost_ms = 0;
  int previous = -1;
};

}  // namespace

double RouteLatencyMs(const std::vector<RouteHop>& route,
                      const LatencyModel& model) {
  double total_ms = 0;
  for (size_t i = 0; i < route.size(); ++i) {
    const ServerSpan& server = route[i].server;
    const double client_half_ms = ClientRttMs(server.node_id, model) / 2;

    double forward_ms = client_half_ms;
    if (i > 0) {
      const double announced_ms =
          AnnouncedRttMs(route[i - 1].server, server.node_id);
      if (announced_ms >= 0) forward_ms = announced_ms / 2;
    }

    total_ms += forward_ms + client_half_ms +
                (route[i].end - route[i].start) * StepMsPerBlock(server, model);
    if (HasLowCache(server, model)) total_ms += model.low_cache_penalty_ms;
  }
  return total_ms;
}

absl::StatusOr<std::vector<RouteHop>> FindFastestRoute(
    const std::vector<ServerSpan>& spans, int start, int end,
    const LatencyModel& model, const RouteOptions& options) {
  if (absl::Status status = CheckRange(start, end); !status.ok()) {
    return status;
  }
  if (absl::Status status = CheckModel(model); !status.ok()) return status;

  // Usable spans, the spans covering each block, and per-span costs.
  const int64_t min_cache_tokens =
      std::max(options.min_cache_tokens, model.tokens_needed);
  const std::vector<int> usable =
      UsableSpans(spans, start, end, options, min_cache_tokens);
  absl::StatusOr<std::vector<std::vector<int>>> covering =
      CoveringSpans(spans, usable, start, end, options, min_cache_tokens);
  if (!covering.ok()) return covering.status();
  const std::vector<SpanCosts> costs = ComputeSpanCosts(spans, usable, model);

  // layers[k] contains the states at boundary start + k, and layer 0 is the
  // client alone. The position arrays map a span to its state in the
  // current and next layer, or -1.
  const int length = end - start;
  std::vector<std::vector<State>> layers(length + 1);
  layers[0].push_back(State{-1, 0, -1});
  std::vector<int> current_position(usable.size(), -1);
  std::vector<int> next_position(usable.size(), -1);

  for (int k = 0; k < length; ++k) {
    const std::vector<State>& layer = layers[k];
    std::vector<State>& next = layers[k + 1];
    for (size_t i = 0; i < layer.size(); ++i) {
      if (layer[i].span >= 0) current_position[layer[i].span] = i;
    }

    // States of this layer ordered by cost, to find for each span the
    // cheapest predecessor without an announced link to it.
    std::vector<int> by_cost(layer.size());
    for (size_t i = 0; i < layer.size(); ++i) by_cost[i] = i;
    std::sort(by_cost.begin(), by_cost.end(), [&layer](int a, int b) {
      return std::make_pair(layer[a].cost_ms, layer[a].span) <
             std::make_pair(layer[b].cost_ms, layer[b].span);
    });

    // Every span covering block start + k gets a state in the next layer:
    // extend its own hop, or start a hop after an unlinked predecessor.
    for (int t : (*covering)[k]) {
      const SpanCosts& cost = costs[t];
      State best{t, kInfinity, -1};
      if (current_position[t] >= 0) {
        best.cost_ms = layer[current_position[t]].cost_ms + cost.step_ms;
        best.previous = t;
      }
      for (int i : by_cost) {
        const int s = layer[i].span;
        if (s == t || (s >= 0 && HasLink(costs[s], t))) continue;
        const double candidate = layer[i].cost_ms + cost.client_half_ms +
                                 cost.enter_ms + cost.step_ms;
        if (candidate < best.cost_ms) {
          best.cost_ms = candidate;
          best.previous = s;
        }
        break;
      }
      next_position[t] = static_cast<int>(next.size());
      next.push_back(best);
    }

    // Hops started after a predecessor that announced an RTT to the node.
    for (const State& from : layer) {
      if (from.span < 0) continue;
      for (const auto& [t, forward_ms] : costs[from.span].links) {
        const int j = next_position[t];
        if (j < 0) continue;
        const double candidate =
            from.cost_ms + forward_ms + costs[t].enter_ms + costs[t].step_ms;
        if (candidate < next[j].cost_ms) {
          next[j].cost_ms = candidate;
          next[j].previous = from.span;
        }
      }
    }

    for (const State& state : layer) {
      if (state.span >= 0) current_position[state.span] = -1;
    }
    for (const State& state : next) next_position[state.span] = -1;
  }

  // Walk back from the cheapest final state, recording which span ran each
  // block, then merge runs of the same span into hops.
  const std::vector<State>& last = layers[length];
  int best = 0;
  for (size_t j = 1; j < last.size(); ++j) {
    if (last[j].cost_ms < last[best].cost_ms) best = j;
  }
  std::vector<int> span_of_block(length);
  int span = last[best].span;
  for (int k = length; k > 0; --k) {
    span_of_block[k - 1] = span;
    if (k == 1) break;
    const std::vector<State>& layer = layers[k];
    const auto it =
        std::find_if(layer.begin(), layer.end(),
                     [span](const State& state) { return state.span == span; });
    // Every state has a finite cost and so a predecessor; the check only
    // guards against a broken invariant.
    if (it == layer.end()) {
      return absl::InternalError(
          absl::StrCat("route search lost its path at block ", start + k - 1));
    }
    span = it->previous;
  }

  std::vector<RouteHop> route;
  for (int k = 0; k < length;) {
    int hop_end = k + 1;
    while (hop_end < length && span_of_block[hop_end] == span_of_block[k]) {
      ++hop_end;
    }
    route.push_back(
        RouteHop{spans[usable[span_of_block[k]]], start + k, start + hop_end});
    k = hop_end;
  }
  return route;
}

absl::StatusOr<std::vector<RouteHop>> SampleThroughputRoute(
    const std::vector<ServerSpan>& spans, int start, int end,
    const std::map<std::string, int>& queued_requests, std::mt19937_64& rng,
    const RouteOptions& options) {
  if (absl::Status status = CheckRange(start, end); !status.ok()) {
    return status;
  }
  const std::vector<int> usable =
      UsableSpans(spans, start, end, options, options.min_cache_tokens);
  absl::StatusOr<std::vector<std::vector<int>>> covering =
      CoveringSpans(spans, usable, start, end, options,
                    options.min_cache_tokens);
  if (!covering.ok()) return covering.status();

  std::vector<RouteHop> route;
  for (int block = start; block < end;) {
    const std::vector<int>& candidates = (*covering)[block - start];

    // Unknown throughputs count as the weakest known one.
    double weakest_known = kInfinity;
    for (int u : candidates) {
      const double throughput = spans[usable[u]].throughput;
      if (throughput > 0) weakest_known = std::min(weakest_known, throughput);
    }
    std::vector<double> weights;
    weights.reserve(candidates.size());
    double total = 0;
    for (int u : candidates) {
      const ServerSpan& span = spans[usable[u]];
      double throughput = span.throughput > 0 ? span.throughput : weakest_known;
      if (throughput == kInfinity) throughput = 1;
      const auto queued = queued_requests.find(span.node_id);
      const int waiting =
          queued == queued_requests.end() ? 0 : std::max(queued->second, 0);
      weights.push_back(throughput / (1.0 + waiting));
      total += weights.back();
    }

    // One draw per hop, from the top 53 bits so the choice does not depend
    // on the standard library's distributions.
    const double draw = static_cast<double>(rng() >> 11) * 0x1.0p-53 * total;
    size_t chosen = 0;
    double cumulative = weights[0];
    while (chosen + 1 < candidates.size() && draw >= cumulative) {
      ++chosen;
      cumulative += weights[chosen];
    }

    const ServerSpan& span = spans[usable[candidates[chosen]]];
    const int hop_end = std::min(span.end, end);
    route.push_back(RouteHop{span, block, hop_end});
    block = hop_end;
  }
  return route;
}

}  // namespace pollen::scheduler
