// Discovery of the nodes that serve a model, through the DHT.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/dht_registry.h"
#include "pollen/v1/pollen.pb.h"
#include "scheduler/route.h"

namespace pollen::client {

// Converts usable records (ONLINE, for `model_id`) into spans for the
// scheduler; one span per node.
std::vector<scheduler::ServerSpan> SpansFromRecords(
    const std::vector<v1::NodeRecord>& records, const std::string& model_id);

// A read-only DHT participant that finds routes. Thread-safe.
class SwarmClient {
 public:
  // Joins the DHT through `initial_peers` (at least one).
  static absl::StatusOr<std::unique_ptr<SwarmClient>> Connect(
      const std::vector<std::string>& initial_peers);

  // Returns the fewest-hops route over blocks [0, num_blocks) of `model_id`,
  // polling the DHT until every block is served or `wait` has passed. The
  // error then names the blocks nobody serves.
  absl::StatusOr<std::vector<scheduler::RouteHop>> FindRoute(
      const std::string& model_id, int num_blocks, absl::Duration wait,
      const scheduler::RouteOptions& route_options = {});

  DhtRegistry& registry() { return *registry_; }

 private:
  explicit SwarmClient(std::unique_ptr<DhtRegistry> registry)
      : registry_(std::move(registry)) {}

  std::unique_ptr<DhtRegistry> registry_;
};

}  // namespace pollen::client
