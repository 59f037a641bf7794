// Routes that minimise the expected time of one decode step, and randomised
// routes that spread stateless forward/backward requests over the swarm.
//
// Pure functions over announced spans, like route.h: no networking, no
// clocks, and randomness only through the caller's generator.
#pragma once

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "scheduler/route.h"

namespace pollen::scheduler {

// The client's estimates of network and compute costs, used to pick a route
// for an inference session.
struct LatencyModel {
  // The client's smoothed round-trip time to each node in milliseconds,
  // measured by Info pings, by node id.
  std::map<std::string, double> client_rtt_ms;
  // Round-trip time in milliseconds assumed for a node missing from
  // `client_rtt_ms`.
  double default_rtt_ms = 50;
  // Decode steps per second through one block assumed for a node that
  // announces a throughput of 0 or less. Must be positive and finite.
  double default_throughput = 1;
  // Cache tokens the session reserves on each hop. Nodes with fewer free
  // cache tokens are never used.
  int64_t tokens_needed = 1;
  // Milliseconds added to a hop whose node has fewer than 2 * tokens_needed
  // cache tokens left, so that sessions avoid nearly full nodes when a
  // comparable route exists.
  double low_cache_penalty_ms = 1000;
};

// Returns the route over blocks [start, end) with the least expected time for
// one decode step, as computed by RouteLatencyMs.
//
// A hop may end before its node's span ends, because a shorter hop can hand
// over to a faster or closer node. Nodes in options.excluded_nodes, nodes with
// fewer than max(options.min_cache_tokens, model.tokens_needed) free cache
// tokens and empty spans are skipped.
//
// The search is a shortest path over states (block boundary b, span whose hop
// ends at b). Every edge advances one block, by extending the current hop or
// by starting a hop on another span, so one pass over the blocks finds it.
// A new hop follows the cheapest state without an announced RTT to the new
// node, or a state whose node announced one. The time is
// O(blocks * (c log c + announced links)) for c spans covering a block. With
// 1,000 nodes of 3 to 32 blocks over 126 blocks and 8 announced RTTs each it
// took about 3 ms on one core of a shared 2-vCPU AMD EPYC virtual machine.
//
// RTTs that are negative, infinite or NaN count as not measured. Returns
// INVALID_ARGUMENT when start >= end, model.default_throughput is not
// positive and finite, or model.default_rtt_ms or model.low_cache_penalty_ms
// is negative or not finite, RESOURCE_EXHAUSTED when every block without a
// usable node has nodes left out only for lack of free cache, and NOT_FOUND
// naming the blocks that no usable node serves otherwise.
absl::StatusOr<std::vector<RouteHop>> FindFastestRoute(
    const std::vector<ServerSpan>& spans, int start, int end,
    const LatencyModel& model, const RouteOptions& options = {});

// Returns the expected milliseconds of one decode step along `route`, the cost
// that FindFastestRoute minimises. Hop i on node n_i running k_i blocks costs
//
//   forward_i + client_rtt(n_i) / 2 + k_i * 1000 / throughput(n_i)
//             + (low_cache_penalty_ms if n_i has < 2 * tokens_needed tokens)
//
// where client_rtt(n) is model.client_rtt_ms[n] or model.default_rtt_ms,
// throughput(n) is the span's throughput or model.default_throughput when it
// is 0 or less, and the forward leg is
//
//   forward_1 = client_rtt(n_1) / 2
//   forward_i = n_{i-1}.next_rtt_ms[n_i] / 2   if n_{i-1} announces it,
//               client_rtt(n_i) / 2            otherwise.
//
// The client_rtt(n_i) / 2 term is the return leg, because the client relays
// hidden states between hops today and so every hop replies to the client.
// NOTE: while the client relays, the forward leg really costs
// client_rtt(n_i) / 2 as well. The announced next_rtt_ms term prices the
// node-to-node forwarding that routes are meant to move to.
double RouteLatencyMs(const std::vector<RouteHop>& route,
                      const LatencyModel& model);

// Picks a route over blocks [start, end) for one stateless forward or backward
// request, sampled hop by hop so that load spreads in proportion to
// throughput. At each block the route has not covered yet, it chooses among
// the usable spans covering that block with probability proportional to
//
//   throughput / (1 + queued_requests[node_id]),
//
// and the chosen span runs to min(span.end, end). A span with unknown
// throughput (0 or less) is weighted as the weakest known candidate of that
// hop, and when no candidate has a known throughput the choice is uniform.
// Usable spans follow `options` as in FindFewestHopsRoute.
//
// The result depends only on the inputs and the state of `rng`, which it
// advances once per hop. Returns INVALID_ARGUMENT when start >= end, and
// RESOURCE_EXHAUSTED or NOT_FOUND as FindFastestRoute does.
absl::StatusOr<std::vector<RouteHop>> SampleThroughputRoute(
    const std::vector<ServerSpan>& spans, int start, int end,
    const std::map<std::string, int>& queued_requests, std::mt19937_64& rng,
    const RouteOptions& options = {});

}  // namespace pollen::scheduler
