// A swarm of `pollen node` processes on 127.0.0.1 for benchmarks, each
// serving a contiguous share of a model's blocks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/cli/child_process.h"
#include "client/remote_chain.h"
#include "client/swarm_client.h"
#include "common/dht_registry.h"
#include "scheduler/route.h"

namespace pollen::bench {

struct LoopbackSwarmOptions {
  // The `pollen` executable that runs the nodes.
  std::string pollen_binary;
  std::string model_dir;
  // Number of node processes; node i serves blocks
  // [i * num_blocks / num_nodes, (i + 1) * num_blocks / num_nodes).
  int num_nodes = 1;
  // --dtype of every node.
  std::string dtype = "float32";
  // --threads of every node; 0 keeps libtorch's default.
  int threads = 0;
  // --cache-tokens of every node: enough for every session opened at once.
  int64_t cache_tokens = 16384;
  // How long the nodes may take to load their blocks and announce them.
  absl::Duration startup_timeout = absl::Minutes(10);
  // Deadline of one step through one node.
  absl::Duration step_timeout = absl::Minutes(10);
  // Server-to-server push in the sessions it opens.
  bool push = false;
  // Encoding of the hidden states of every session.
  v1::Compression compression = v1::COMPRESSION_NONE;
};

// Starts a DHT bootstrap node in this process and the node processes, and
// opens sessions through them. Nodes neither move (rebalancing is off) nor
// replace each other, so every session takes the same route. A failed node
// ends the sessions through it with an error.
//
// Open and Stop are not thread-safe; OpenSession may be called from
// several threads at once. Destruction stops the nodes.
class LoopbackSwarm {
 public:
  // Starts the nodes and waits until every block is announced. Node logs,
  // identities and throughput caches go to a temporary folder, which is
  // removed by Stop unless a node failed. Returns an error with the end of
  // the log of a node that exits early, or DEADLINE_EXCEEDED after
  // options.startup_timeout.
  static absl::StatusOr<std::unique_ptr<LoopbackSwarm>> Start(
      const LoopbackSwarmOptions& options, const std::string& model_id,
      int num_blocks);

  ~LoopbackSwarm();
  LoopbackSwarm(const LoopbackSwarm&) = delete;
  LoopbackSwarm& operator=(const LoopbackSwarm&) = delete;

  // Opens one session of `max_length` positions through every node.
  absl::StatusOr<std::unique_ptr<client::InferenceChain>> OpenSession(
      int64_t max_length);

  const std::vector<scheduler::RouteHop>& route() const { return route_; }
  const std::string& work_dir() const { return work_dir_; }

  // Sends SIGTERM to every node and waits for them to exit. Sessions must
  // be closed first, or each node waits for its drain timeout.
  void Stop();

 private:
  LoopbackSwarm(LoopbackSwarmOptions options, std::string model_id,
                std::string work_dir);

  // Polls the DHT until one route covers [0, num_blocks), failing early
  // when a node exits.
  absl::Status WaitForRoute(int num_blocks);

  const LoopbackSwarmOptions options_;
  const std::string model_id_;
  const std::string work_dir_;
  std::unique_ptr<DhtRegistry> bootstrap_;
  std::unique_ptr<client::SwarmClient> swarm_;
  std::vector<cli::ChildProcess> nodes_;
  std::vector<scheduler::RouteHop> route_;
  ChannelPool channels_;
  bool keep_work_dir_ = false;
};

}  // namespace pollen::bench
