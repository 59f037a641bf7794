// Choice of a chain of nodes that together run blocks [start, end).
//
// Pure functions over announced spans: no networking, no clocks. The client
// turns DHT records into ServerSpans and requests a route.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace pollen::scheduler {

// A node's announced span of blocks [start, end).
struct ServerSpan {
  std::string node_id;
  std::string address;  // host:port of its BlockService
  int start = 0;
  int end = 0;
  // Decode steps per second through one block; 0 when unknown.
  double throughput = 0;
  // Prompt tokens per second through one block; 0 when unknown.
  double prefill_throughput = 0;
  // Cache tokens the node can still reserve.
  int64_t cache_tokens_left = 0;
  // Announced round-trip times in milliseconds from this node to the nodes
  // serving the blocks after its span, by node id.
  std::map<std::string, double> next_rtt_ms;
};

// One hop of a route: `server` runs blocks [start, end), a sub-range of its
// span.
struct RouteHop {
  ServerSpan server;
  int start = 0;
  int end = 0;
};

struct RouteOptions {
  // Nodes never used, such as ones that just failed.
  std::set<std::string> excluded_nodes;
  // Cache tokens a hop must still have free; nodes with fewer are skipped.
  int64_t min_cache_tokens = 0;
};

// Returns a route over blocks [start, end) with the fewest hops. Among routes
// with as many hops, it prefers nodes with more free cache, then higher
// throughput, then the smaller node id, so the result is deterministic.
// Returns NOT_FOUND naming the blocks that no usable node serves, and
// INVALID_ARGUMENT when start >= end.
absl::StatusOr<std::vector<RouteHop>> FindFewestHopsRoute(
    const std::vector<ServerSpan>& spans, int start, int end,
    const RouteOptions& options = {});

// Returns blocks of [start, end) that no span covers, as sorted indices.
std::vector<int> FindUnservedBlocks(const std::vector<ServerSpan>& spans,
                                    int start, int end);

// Formats sorted block indices as ranges, e.g. "2-4, 7".
std::string FormatBlockList(const std::vector<int>& blocks);

}  // namespace pollen::scheduler
