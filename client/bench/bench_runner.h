// `pollen bench`: decode and prefill speed of a model with every block in
// this process, the same through a swarm of node processes on loopback, the
// aggregate speed of concurrent sessions, and the memory-bandwidth bound.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/bench/memory_bandwidth.h"
#include "common/model_config.h"

namespace pollen::bench {

struct BenchOptions {
  // Hugging Face checkpoint folder with tokenizer.model.
  std::string model_dir;
  // The `pollen` executable that runs the nodes.
  std::string pollen_binary;
  // Node processes; each serves a contiguous share of the blocks.
  int num_nodes = 2;
  // Sessions decoding at once for the aggregate speed.
  int sessions = 8;
  // Tokens of the prompt, run in one prefill step.
  int prompt_tokens = 32;
  // Decode steps after the prompt, one token each.
  int new_tokens = 32;
  // Timed runs of each measurement after one untimed warm-up; the median
  // counts.
  int repetitions = 3;
  // Dtype of the block weights and KV cache, here and on the nodes. The
  // embeddings, final norm and LM head are float32, as in the client.
  std::string dtype = "float32";
  // libtorch intra-op threads of this process and of every node; 0 keeps
  // libtorch's default.
  int threads = 0;
  // Server-to-server push through the swarm (see ClientOptions::push).
  bool push = false;
  // Encoding of the hidden states between this process and the nodes, a
  // ParseCompression name. A lossy one may change the swarm's tokens, which
  // the result then reports as a mismatch.
  std::string compression = "none";
  MemoryBandwidthOptions bandwidth;
};

// Largest BenchOptions::sessions; each session is a KV cache on every
// node, and a thread of this process in the threaded measurement.
inline constexpr int kMaxBenchSessions = 256;

// Speeds are medians over the repetitions, in tokens per second.
struct BenchResult {
  // Setup of the run.
  std::string model_id;
  int num_blocks = 0;
  std::string dtype;
  std::string compression;  // of the hidden states, as CompressionName
  int threads = 0;  // libtorch intra-op threads of this process
  bool push = false;  // whether swarm sessions used server-to-server push
  int nodes = 0;
  int sessions = 0;
  int prompt_tokens = 0;
  int new_tokens = 0;
  int repetitions = 0;

  // Every block in this process.
  double local_decode_tok_s = 0;
  double local_prefill_tok_s = 0;
  // One session through the nodes.
  double swarm_decode_tok_s = 0;
  double swarm_prefill_tok_s = 0;
  // Decode tokens of all sessions per second of wall time, with `sessions`
  // sessions decoding at once through the nodes: driven by one thread
  // through a StepGroup, so that each step of all of them travels in one
  // message per node...
  double aggregate_tok_s = 0;
  // ...and each on a thread and streams of its own, as separate clients.
  double threaded_aggregate_tok_s = 0;

  double decode_ratio = 0;     // swarm / local decode
  double prefill_ratio = 0;    // swarm / local prefill
  double aggregate_ratio = 0;  // aggregate / one swarm session's decode
  double threaded_aggregate_ratio = 0;  // the same for threaded sessions
  // Extra milliseconds per decoded token per node:
  // (swarm ms per token - local ms per token) / nodes.
  double hop_overhead_ms = 0;

  MemoryBandwidth bandwidth;
  // Bytes a decode step reads: every block weight, and the final norm and
  // LM head in float32. The one embedding row it reads is left out.
  int64_t block_weight_bytes = 0;
  int64_t head_weight_bytes = 0;
  // bandwidth / weight bytes: the decode speed if reading the weights were
  // the only cost.
  double bound_tok_s = 0;
  double bound_fraction = 0;  // local decode / bound

  // Whether every run (local, swarm, each concurrent session) picked the
  // same tokens; `mismatch` describes the first difference.
  bool tokens_match = false;
  std::string mismatch;
  // The local run's greedy tokens: one after the prompt, then one per
  // decode step.
  std::vector<int> new_ids;
};

// Checks `options` against the model. Returns INVALID_ARGUMENT naming the
// option, its value and the valid range.
absl::Status ValidateBenchOptions(const BenchOptions& options,
                                  const ModelConfig& config);

// Runs the benchmark in phases: the memory bandwidth, then the local runs,
// after which the local blocks are freed. Then it starts the nodes, runs
// one session at a time and then `sessions` at once, and stops the nodes.
// A token mismatch is reported in the result, not as an error. Returns the
// first error of any phase (ValidateBenchOptions' errors included), naming
// the phase.
absl::StatusOr<BenchResult> RunBench(const BenchOptions& options);

}  // namespace pollen::bench
