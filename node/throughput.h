// Throughput of this node on one block: measured at start, cached in a JSON
// file per model, block shape, device and dtype, and announced in the DHT.
#pragma once

#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "node/quantized_linear.h"

namespace pollen::node {

class BlockSpan;

struct Throughput {
  // Decode steps per second through one block: one new token, batch 1.
  double decode_steps_per_s = 0;
  // Prompt tokens per second through one block, in one chunk.
  double prefill_tokens_per_s = 0;
};

// Decode steps in a measurement. Each is timed on its own and the median
// counts, so that one slow step (a page fault, another process) does not
// skew the result.
inline constexpr int kMeasuredDecodeSteps = 5;
// Tokens in the measured prefill chunk, fewer when the model's
// max_position_embeddings is smaller.
inline constexpr int kMeasuredPrefillTokens = 128;

// Measures the throughput of block span.start() with batch 1: one untimed
// one-token warm-up, one prefill chunk of kMeasuredPrefillTokens, then
// kMeasuredDecodeSteps one-token steps, all with a fresh KV cache. Inputs
// come from and results return to the CPU, as requests do, so CUDA steps
// include their transfers and synchronisation. Returns the span's Forward
// error when a step fails.
absl::StatusOr<Throughput> MeasureThroughput(const BlockSpan& span);

// The cache entry name of a measurement: model id, block shape, device,
// dtype, quantization (only when not none, so that older entries stay
// valid) and libtorch's intra-op thread count, e.g.
// "stories260k hidden=64 intermediate=172 heads=8 kv_heads=4 head_dim=8
// device=cpu dtype=float32 quantization=int8 threads=2" (one line).
std::string ThroughputCacheKey(const std::string& model_id,
                               const ModelConfig& config,
                               const at::Device& device, at::ScalarType dtype,
                               Quantization quantization, int threads);

// Returns $XDG_CACHE_HOME/pollen/throughput.json, or
// $HOME/.cache/pollen/throughput.json, or "" when neither variable is set.
std::string DefaultThroughputCachePath();

// Returns the entry `key` of the cache file at `path`. NOT_FOUND: the file
// or the entry is missing. DATA_LOSS: the file is not a throughput cache.
absl::StatusOr<Throughput> ReadCachedThroughput(const std::string& path,
                                                const std::string& key);

// Adds or replaces the entry `key` in the cache file at `path`, creating its
// folder. Writes a temporary file and renames it over the old one, so
// readers never see a partial file. A malformed file is replaced.
// NOTE: two nodes writing at the same moment each keep their own entry and
// may drop the other's, which only costs a measurement at the next start.
absl::Status WriteCachedThroughput(const std::string& path,
                                   const std::string& key,
                                   const Throughput& throughput);

}  // namespace pollen::node
