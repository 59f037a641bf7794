// Hugging Face Llama checkpoints with real layer shapes and random weights,
// for benchmarks: `pollen make-checkpoint`.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/safetensors.h"

namespace pollen::bench {

// Architecture of a model family member, as its config.json states it.
struct CheckpointShape {
  std::string name;  // e.g. "tinyllama-1.1b"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t num_hidden_layers = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
};

// tinyllama-1.1b, llama2-7b and llama2-70b with their published
// dimensions, and test-tiny (hidden 64, 2 blocks, vocabulary 512: a few
// hundred KB, for tests).
const std::vector<CheckpointShape>& KnownCheckpointShapes();

// Returns the shape called `name`, or INVALID_ARGUMENT listing the names.
absl::StatusOr<CheckpointShape> FindCheckpointShape(const std::string& name);

// Safetensors files start a new shard before they would pass this size,
// like Hugging Face's max_shard_size="2GB".
inline constexpr int64_t kDefaultShardBytes = 2'000'000'000;

struct RandomCheckpointOptions {
  CheckpointShape shape;
  // num_hidden_layers; 0 keeps shape.num_hidden_layers.
  int64_t num_layers = 0;
  // Element type of every tensor: kF32, kF16 or kBF16.
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  // Folder to create. It must not exist or be empty.
  std::string out_dir;
  // The same seed, shape and dtype give byte-identical files.
  uint64_t seed = 0;
  // Largest shard in bytes; a checkpoint that fits is one model.safetensors.
  // A single tensor larger than this gets a shard of its own.
  int64_t shard_bytes = kDefaultShardBytes;
  // Called after each safetensors file with its name and the tensor bytes
  // written so far and in all; may be empty.
  std::function<void(const std::string& file_name, int64_t bytes_done,
                     int64_t bytes_total)>
      on_file_written;
};

// Summary of a checkpoint written by WriteRandomCheckpoint.
struct RandomCheckpointSummary {
  ModelConfig config;
  // Safetensors file names in the folder, in order.
  std::vector<std::string> weight_files;
  int64_t num_tensors = 0;
  int64_t weight_bytes = 0;  // tensor data, headers excluded
};

// Writes config.json, tokenizer.model (MakeSyntheticBpeModel) and the
// weights: model.embed_tokens.weight, each block's nine tensors,
// model.norm.weight and lm_head.weight (not tied). Linear and embedding
// weights are drawn from N(0, 0.02^2), Hugging Face's initializer_range for
// Llama, and norm weights are 1. Each tensor's values depend only on the
// seed and the tensor's name, so block 0 is the same whatever num_layers
// is. Tensors are generated and written one at a time, so memory use is
// about one tensor in float32.
//
// Returns INVALID_ARGUMENT for a bad shape or layer count,
// FAILED_PRECONDITION when out_dir exists and is not empty, and INTERNAL
// when a file cannot be written.
absl::StatusOr<RandomCheckpointSummary> WriteRandomCheckpoint(
    const RandomCheckpointOptions& options);

}  // namespace pollen::bench
