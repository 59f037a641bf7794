// A Pollen node: serves a span of blocks over gRPC and announces it in the
// DHT until it receives SIGINT or SIGTERM.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace pollen::node {

struct NodeOptions {
  // Hugging Face checkpoint folder; only the tensors of the span are read.
  std::string model_dir;
  // Id announced in the DHT; empty means DefaultModelId(model_dir).
  std::string model_id;
  // Blocks [block_start, block_end) to serve. A block_end of 0 lets the node
  // choose its span from the swarm's records (see num_blocks).
  int block_start = 0;
  int block_end = 0;
  // Length of the span the node chooses; 0 means as many blocks as fit in
  // the device's free memory next to the KV cache budget.
  int num_blocks = 0;
  // Seeds the jitter of the span choice and of rebalancing; 0 draws a
  // random seed.
  uint64_t seed = 0;

  // Decode steps per second through one block to announce instead of a
  // measurement; 0 measures at start, or reads an earlier measurement from
  // the throughput cache.
  double throughput = 0;
  // JSON file that keeps measurements across starts; empty means
  // DefaultThroughputCachePath() (~/.cache/pollen/throughput.json).
  std::string throughput_cache_path;

  // Address the gRPC server binds; port 0 picks a free port.
  std::string listen_host = "0.0.0.0";
  int port = 0;
  // Host clients use to reach this node, announced with the bound port.
  std::string announce_host = "127.0.0.1";
  // UDP port of the DHT; 0 picks a free port.
  int dht_port = 0;
  // DHT peers to join ("host:port"); empty starts a new swarm.
  std::vector<std::string> initial_peers;
  // File of the node's signing identity, created on first start. Empty
  // means a new identity on every start.
  std::string identity_path;
  // Name shown by `pollen status`; defaults to the announced address.
  std::string public_name;

  // Cache tokens (batch * positions) all sessions may reserve together.
  int64_t cache_tokens = 16384;
  // Most tokens (batch x new tokens, over all sessions) in one forward
  // pass. Decode steps of concurrent sessions share passes up to this
  // size, and longer prefills run in chunks of it, which bounds activation
  // memory. Larger chunks give prefill larger matrix products.
  int64_t prefill_chunk = 512;
  // Sessions without a step for this long are freed.
  absl::Duration session_idle_timeout = absl::Minutes(5);
  // How often the record is re-announced, and how long each announcement
  // stays valid. The validity must exceed the period so that records do not
  // lapse between refreshes.
  absl::Duration announce_period = absl::Seconds(30);
  absl::Duration record_ttl = absl::Seconds(90);
  // How long open sessions may go on after SIGTERM or a move before they are
  // cancelled. Their responses meanwhile carry `draining`.
  absl::Duration drain_timeout = absl::Seconds(30);
  // How often the node checks whether other blocks would serve the swarm
  // better; zero disables rebalancing.
  absl::Duration rebalance_period = absl::Minutes(5);
  // A rebalance moves only when the swarm's weakest block gets at least this
  // many times faster.
  double min_balance_gain = 1.25;

  // The dtype of activations, KV cache and (without quantization) weights:
  // "float32", "float16" or "bfloat16", or fp32, fp16, bf16 for short.
  std::string dtype = "float32";
  // "none", or "int8" to store the linear weights of the blocks as int8 with
  // one scale per output channel: about a quarter of the float32 bytes, at
  // some cost in accuracy. Activations and the KV cache stay in `dtype`.
  std::string quantization = "none";
  // libtorch device string: "cpu", "cuda", "cuda:1".
  std::string device = "cpu";
  // Intra-op threads for libtorch; 0 keeps libtorch's default.
  int threads = 0;
};

// Returns INVALID_ARGUMENT, naming the flag and its value, for options that
// cannot work whatever the checkpoint: out-of-range numbers and ports, and
// a --host that does not resolve. RunNode runs the same check first.
absl::Status ValidateNodeOptions(const NodeOptions& options);

// Runs a node until SIGINT or SIGTERM. It then withdraws its records and
// lets open sessions finish, with `draining` set in their responses, until
// they close or the drain timeout passes. A second signal ends the wait.
// Returns an error when the node cannot start: bad options, a missing or
// broken checkpoint, a port in use, too little memory, or an unreachable
// DHT.
absl::Status RunNode(const NodeOptions& options);

}  // namespace pollen::node
