// The fine-tuning loop behind `pollen finetune`.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/training/adapter_set.h"

namespace pollen::client {

struct FinetuneOptions {
  // Checkpoint folder with config.json, the weights and tokenizer.model.
  std::string model_dir;
  // .txt (one example a line) or .jsonl ({"text": ...} a line).
  std::string data_path;
  // Method and its sizes; base_model defaults to model_dir.
  AdapterConfig adapter;
  int64_t steps = 100;
  int batch_size = 4;
  // Examples are cut to this many tokens, BOS included.
  int seq_len = 128;
  // Adam learning rate.
  double learning_rate = 1e-3;
  // Folder that receives the adapter (and the optimizer state for --resume).
  std::string output_dir;
  // Seeds the adapter initialisation and the example order.
  uint64_t seed = 0;
  // Run every block in this process instead of through the swarm.
  bool local = true;
  // Swarm settings when local is false: DHT peers ("host:port"), the model
  // id the nodes announce (empty means the folder name), and how long to
  // wait for nodes covering every block.
  std::vector<std::string> initial_peers;
  std::string model_id;
  absl::Duration discovery_wait = absl::Seconds(30);
  // Encoding of the hidden states and their gradients sent to and from the
  // nodes, a ParseCompression name: none, fp16, bf16 or int8. Adapter
  // weights and their gradients always travel uncompressed.
  std::string compression = "none";
  // CSV file with header step,loss,tokens_per_s and one row per step;
  // empty writes none.
  std::string loss_log_path;
  // Continue from the adapter, optimizer state and step in output_dir.
  bool resume = false;
};

// Progress of one finished optimizer step.
struct StepReport {
  int64_t step = 0;   // 1-based
  int64_t total_steps = 0;
  double loss = 0;    // mean next-token cross entropy before the update
  double tokens_per_s = 0;
  double eta_s = 0;   // estimate from the mean step time so far
};

struct FinetuneResult {
  int64_t steps_done = 0;  // including steps of earlier runs when resumed
  double first_loss = 0;
  double last_loss = 0;
  bool interrupted = false;
};

// Trains an adapter with Adam and saves it to options.output_dir at the end,
// or after the step during which `*stop` became true. Calls `on_step` after
// every step. Returns INVALID_ARGUMENT for bad options or data, NOT_FOUND
// for missing files, and the swarm's error when a pass through it fails
// after the allowed reroutes.
absl::StatusOr<FinetuneResult> RunFinetune(
    const FinetuneOptions& options, const std::atomic<bool>* stop = nullptr,
    const std::function<void(const StepReport&)>& on_step = nullptr);

}  // namespace pollen::client
