// Checkpoint folders built from the test models.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace pollen::testing {

// Copies the single-file checkpoint in `src_dir` into `dst_dir` as shards:
// model-0000K-of-0000N.safetensors for K = 1..num_hidden_layers holds block
// K - 1, and the last shard (K = N = num_hidden_layers + 1) holds every
// tensor outside the blocks (embeddings, final norm, LM head). Also writes
// model.safetensors.index.json and copies config.json and every other file
// that is not a safetensors file or index (tokenizer files and the like).
// Returns the N shard file names: block shards in block order, then the
// embeddings shard.
absl::StatusOr<std::vector<std::string>> MakeShardedCopy(
    const std::string& src_dir, const std::string& dst_dir);

}  // namespace pollen::testing
