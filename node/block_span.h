// The contiguous range of Llama blocks that one node serves.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "common/checkpoint.h"
#include "common/model_config.h"
#include "node/adapters.h"
#include "node/llama_block.h"
#include "node/quantized_linear.h"

namespace pollen::node {

// One session's part of a batched pass (BlockSpan::ForwardBatch).
struct SpanBatchEntry {
  // [batch, new_tokens, hidden_size] in any float dtype, on any device.
  at::Tensor hidden;
  // The session's caches; (*cache)[i] belongs to block from + i.
  std::vector<LayerKvCache>* cache = nullptr;
  // Position of the first new token.
  int64_t position = 0;
};

// Blocks [start, end) of one model, loaded from a Checkpoint, plus their
// shared rotary table. Immutable after Load, so thread-safe. Sessions keep
// their own KV caches (AllocateCache) and pass them to Forward.
class BlockSpan {
 public:
  // Loads the weights of blocks [start, end) only, so the checkpoint's other
  // shards may be absent. `dtype` is float32, bfloat16 or (off the CPU)
  // float16, and the blocks compute and keep their KV cache in it; with
  // Quantization::kInt8 their linear weights are stored as int8 (see
  // QuantizedLinear). Returns INVALID_ARGUMENT when the range is empty or
  // outside [0, num_hidden_layers] or the dtype is unsupported, and the
  // checkpoint's error when a tensor is missing or misshaped.
  static absl::StatusOr<std::unique_ptr<BlockSpan>> Load(
      const Checkpoint& checkpoint, int start, int end, at::ScalarType dtype,
      at::Device device, Quantization quantization = Quantization::kNone);

  BlockSpan(const BlockSpan&) = delete;
  BlockSpan& operator=(const BlockSpan&) = delete;

  int start() const { return start_; }
  int end() const { return end_; }
  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  Quantization quantization() const { return quantization_; }

  // Bytes of all block weights as stored: int8 values and their scales
  // when quantised.
  int64_t ParameterBytes() const;

  // Bytes of KV cache per token per block: 2 * kv_heads * head_dim * element
  // size.
  int64_t CacheBytesPerTokenPerBlock() const;

  // Returns one zero-filled LayerKvCache per block of [from, to), each
  // [batch, kv_heads, max_length, head_dim] in the span's dtype and device.
  // Returns an empty vector when start <= from < to <= end does not hold or
  // batch or max_length is not positive. Throws c10::Error (or
  // std::bad_alloc) when the allocation fails.
  std::vector<LayerKvCache> AllocateCache(int from, int to, int64_t batch,
                                          int64_t max_length) const;

  // Runs blocks [from, to) (absolute indices, start <= from < to <= end) on
  // `hidden` [batch, new_tokens, hidden_size] at positions [position,
  // position + new_tokens); cache[i] belongs to block from + i. `hidden` may
  // be any float dtype on any device: it is converted to the span's dtype and
  // device and the result [batch, new_tokens, hidden_size] converted back.
  // Runs without autograd. Returns INVALID_ARGUMENT for a bad range, shape,
  // cache or position, and INTERNAL (RESOURCE_EXHAUSTED when out of memory)
  // naming the block and shapes when libtorch fails.
  //
  // `adapters`, when not null, maps absolute block indices to LoRA updates
  // and deep prompts applied to those blocks, as LlamaBlock::Forward does.
  absl::StatusOr<at::Tensor> Forward(
      const at::Tensor& hidden, std::vector<LayerKvCache>& cache,
      int64_t position, int from, int to,
      const std::map<int, BlockAdapter>* adapters = nullptr) const;

  // Runs blocks [from, to) on the new tokens of several sessions in one
  // pass: the projections and MLPs see the rows of all entries together,
  // so each weight is read once, and attention runs per entry on its own
  // cache and positions (see LlamaBlock::ForwardBatch). Returns one output
  // per entry, [batch, new_tokens, hidden_size] in the dtype and on the
  // device of its hidden states, equal to what Forward returns for that
  // entry alone up to floating-point rounding. Errors as Forward. An error
  // fails the whole pass, and the caches may then hold writes at the
  // entries' new positions, which their next steps overwrite.
  absl::StatusOr<std::vector<at::Tensor>> ForwardBatch(
      const std::vector<SpanBatchEntry>& entries, int from, int to) const;

  // Runs blocks [from, to) on a whole sequence `hidden` [batch, seq,
  // hidden_size] at positions [0, seq), without a cache, applying
  // adapters[i] (prompt and LoRA) to block i where present. Converts like
  // Forward, differentiably. Takes no autograd guard: callers choose between
  // inference (NoGradGuard) and training. Returns INVALID_ARGUMENT for a bad
  // range or shape, or when seq exceeds max_position_embeddings, and
  // INTERNAL (RESOURCE_EXHAUSTED when out of memory) when libtorch fails.
  absl::StatusOr<at::Tensor> ForwardNoCache(
      const at::Tensor& hidden, int from, int to,
      const std::map<int, BlockAdapter>& adapters) const;

 private:
  BlockSpan(int start, int end, ModelConfig config, at::ScalarType dtype,
            at::Device device, Quantization quantization,
            std::vector<LlamaBlock> blocks);

  absl::Status ValidateForward(const at::Tensor& hidden,
                               const std::vector<LayerKvCache>& cache,
                               int64_t position, int from, int to) const;

  // True when the span computes in float32 on the CPU and every entry's
  // hidden states are contiguous float32 CPU tensors, so that ForwardBatch
  // can copy rows in and out with memcpy.
  bool PlainFloatCpu(const std::vector<SpanBatchEntry>& entries) const;

  const int start_;
  const int end_;
  const ModelConfig config_;
  const at::ScalarType dtype_;
  const at::Device device_;
  const Quantization quantization_;
  const std::vector<LlamaBlock> blocks_;  // blocks_[i] is block start_ + i
};

}  // namespace pollen::node
