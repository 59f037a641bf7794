// Discovery of the nodes that serve a model, through the DHT.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/remote_chain.h"
#include "client/rtt_tracker.h"
#include "common/dht_registry.h"
#include "common/node_records.h"
#include "pollen/v1/pollen.pb.h"
#include "scheduler/route.h"

namespace pollen::client {

// A read-only DHT participant that finds routes. Thread-safe.
class SwarmClient {
 public:
  // Joins the DHT through `initial_peers` (at least one).
  static absl::StatusOr<std::unique_ptr<SwarmClient>> Connect(
      const std::vector<std::string>& initial_peers);

  // Returns the route over blocks [start, end) of `model_id` with the
  // lowest expected step latency: network time measured by pinging the
  // candidates plus compute time from announced throughput. The route
  // avoids banned nodes and `route_options.excluded_nodes`, and its nodes
  // can still reserve `tokens_needed` cache tokens. Polls the DHT until every
  // block is served or `wait` has passed; the error then names the blocks
  // no node serves. Returns RESOURCE_EXHAUSTED at once when nodes serve the
  // blocks but none has that much free cache by its own count (Info).
  absl::StatusOr<std::vector<scheduler::RouteHop>> FindRoute(
      const std::string& model_id, int start, int end, absl::Duration wait,
      const scheduler::RouteOptions& route_options = {},
      int64_t tokens_needed = 1);

  // Bans `node_id` from routes for a time that doubles with each failure
  // in a row (1 s, 2 s, 4 s, ... up to 5 minutes).
  void ReportFailure(const std::string& node_id);
  // Nodes banned at `now`.
  std::set<std::string> BannedNodes(absl::Time now) const;

  DhtRegistry& registry() { return *registry_; }

 private:
  struct Ban {
    int failures = 0;
    absl::Time until;
  };

  explicit SwarmClient(std::unique_ptr<DhtRegistry> registry)
      : registry_(std::move(registry)), rtts_(channels_) {}

  std::unique_ptr<DhtRegistry> registry_;
  ChannelPool channels_;  // for pings only
  RttTracker rtts_;
  mutable absl::Mutex mu_;
  std::map<std::string, Ban> bans_ ABSL_GUARDED_BY(mu_);
};

}  // namespace pollen::client
