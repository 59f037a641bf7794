// One Llama decoder block (Hugging Face LlamaDecoderLayer) with a KV cache.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "common/checkpoint.h"
#include "common/model_config.h"
#include "node/adapters.h"
#include "node/quantized_linear.h"

namespace pollen::node {

// Keys and values of one block for one session, after rotary embedding.
// Both are [batch, num_key_value_heads, max_length, head_dim] in the block's
// dtype and on its device. Owned by the session, not by the block.
struct TransposedProjections;  // node/cpu_block_forward.h

struct LayerKvCache {
  at::Tensor keys;
  at::Tensor values;
};

// The new tokens of one session in a batched pass (LlamaBlock::ForwardBatch):
// `batch` sequences of `tokens` tokens each at positions [position,
// position + tokens), attending over their own `cache`.
struct SequenceSlice {
  LayerKvCache* cache = nullptr;  // null only inside ForwardNoCache
  int64_t position = 0;
  int64_t batch = 1;
  int64_t tokens = 1;
};

// Weights of one block in Hugging Face layout: linear weights are
// [out_features, in_features], norm weights are [hidden_size].
struct LlamaBlockWeights {
  at::Tensor input_layernorm;           // [hidden]
  at::Tensor q_proj;                    // [heads * head_dim, hidden]
  at::Tensor k_proj;                    // [kv_heads * head_dim, hidden]
  at::Tensor v_proj;                    // [kv_heads * head_dim, hidden]
  at::Tensor o_proj;                    // [hidden, heads * head_dim]
  at::Tensor post_attention_layernorm;  // [hidden]
  at::Tensor gate_proj;                 // [intermediate, hidden]
  at::Tensor up_proj;                   // [intermediate, hidden]
  at::Tensor down_proj;                 // [hidden, intermediate]
};

// Rotary position tables in Hugging Face's rotate-half layout: for position p
// and column j, angle = p * theta^(-2 (j mod head_dim/2) / head_dim), so the
// two halves of each row repeat the same frequencies. Computed in float64,
// stored in `dtype`. Immutable after construction, so thread-safe.
class RotaryEmbedding {
 public:
  RotaryEmbedding(const ModelConfig& config, int64_t max_positions,
                  at::ScalarType dtype, at::Device device);

  const at::Tensor& cos() const { return cos_; }  // [max_positions, head_dim]
  const at::Tensor& sin() const { return sin_; }  // [max_positions, head_dim]
  int64_t max_positions() const { return max_positions_; }

 private:
  int64_t max_positions_;
  at::Tensor cos_;
  at::Tensor sin_;
};

// A Llama decoder block: RMSNorm, grouped-query self-attention with rotary
// embeddings and a KV cache, RMSNorm, SwiGLU MLP, each with a residual.
//
// Immutable after construction. Forward is const and thread-safe across
// sessions as long as each call gets its own cache. Forward takes no autograd
// guard itself, so callers choose between inference and training.
class LlamaBlock {
 public:
  // Takes `weights` in `config`'s shapes on one device, and the rotary
  // tables of the block's dtype and that device. The norm weights set the
  // block's dtype. Without quantization the projections must have that
  // dtype too; with Quantization::kInt8 they may have any float dtype and
  // are quantised here. Throws c10::Error when a shape differs.
  LlamaBlock(int block_index, const ModelConfig& config,
             LlamaBlockWeights weights,
             std::shared_ptr<const RotaryEmbedding> rotary,
             Quantization quantization = Quantization::kNone);

  // Loads tensors model.layers.{block_index}.* from `checkpoint`, converted
  // to `dtype` on `device`. With Quantization::kInt8 the projections are
  // read as float32, so that their scales do not depend on `dtype`, and
  // quantised. Errors name the missing or misshaped tensor.
  static absl::StatusOr<LlamaBlock> Load(
      const Checkpoint& checkpoint, int block_index, at::ScalarType dtype,
      at::Device device, std::shared_ptr<const RotaryEmbedding> rotary,
      Quantization quantization = Quantization::kNone);

  // Runs the block on `hidden` [batch, new_tokens, hidden_size], whose
  // tokens sit at positions [position, position + new_tokens). Writes their
  // keys and values into `cache` at those positions and attends causally
  // over cache positions [0, position + new_tokens), so cache positions
  // below `position` must hold this session's earlier tokens. Returns
  // [batch, new_tokens, hidden_size] in the block's dtype.
  //
  // Throws c10::Error when dtypes, devices or shapes disagree, or when
  // position + new_tokens exceeds the cache length or the rotary table.
  //
  // `adapter`, when not null, adds its LoRA updates to the projections, and
  // its prompt [batch or 1, prefix_len, hidden_size] to the new tokens at
  // positions below prefix_len, as ForwardNoCache does for a whole sequence.
  at::Tensor Forward(const at::Tensor& hidden, LayerKvCache& cache,
                     int64_t position,
                     const BlockAdapter* adapter = nullptr) const;

  // Runs the block on the new tokens of several sessions at once, each with
  // its own cache and positions. `hidden` is [rows, hidden_size]: the
  // [batch, tokens] rows of each slice in row-major order, one slice after
  // the other. The projections and the MLP run on all rows together, so the
  // weights are read once per call. Attention runs per slice, as Forward
  // does for that session alone. Returns [rows, hidden_size] in the block's
  // dtype.
  //
  // Throws c10::Error as Forward does for any slice, or when the slices do
  // not add up to the rows of `hidden`.
  at::Tensor ForwardBatch(const at::Tensor& hidden,
                          const std::vector<SequenceSlice>& slices) const;

  // Runs the block on a whole sequence `hidden` [batch, seq, hidden_size] at
  // positions [0, seq) with causal attention and no cache. When `adapter`
  // has a prompt [batch or 1, prefix_len, hidden_size], it is added to
  // hidden[:, :prefix_len] first; its LoRA updates apply to the
  // projections. Writes into no input tensor, so autograd can run through
  // it (the caller chooses the grad mode). Returns [batch, seq, hidden_size].
  //
  // Throws c10::Error when dtypes, devices or shapes disagree, or when seq
  // exceeds the rotary table.
  at::Tensor ForwardNoCache(const at::Tensor& hidden,
                            const BlockAdapter* adapter) const;

  int block_index() const { return block_index_; }
  at::ScalarType dtype() const;
  at::Device device() const;
  Quantization quantization() const { return qkv_proj_.quantization(); }
  // Bytes of all weights as stored, without the transposed copies of
  // small blocks (see kTransposedCopyMaxBytes).
  int64_t ParameterBytes() const;

 private:
  // [batch, seq, hidden] -> [batch, seq, hidden]: x / rms(x) * weight, with
  // the statistics in float32.
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight) const;

  // Both sublayers on `hidden`, which is [batch, new_tokens, hidden] for a
  // single slice or [rows, hidden] for several, with libtorch operators.
  // A slice whose cache is null attends over its new tokens only, which sit
  // at positions [0, new_tokens).
  at::Tensor Run(const at::Tensor& hidden,
                 const std::vector<SequenceSlice>& slices,
                 const BlockAdapter* adapter) const;

  // Self-attention on normalized input shaped like Run's `hidden`; returns
  // the o_proj output of the same shape.
  at::Tensor Attention(const at::Tensor& x,
                       const std::vector<SequenceSlice>& slices,
                       const BlockAdapter* adapter) const;

  // Attention of one slice: rotary embedding of q [batch, tokens, heads, d]
  // and k [batch, tokens, kv_heads, d], keys and values appended to the
  // slice's cache, then softmax(q k^T / sqrt(d)) v. Returns the context
  // [batch * tokens, heads * d].
  at::Tensor AttendSlice(at::Tensor q, at::Tensor k, const at::Tensor& v,
                         const SequenceSlice& slice) const;

  // Throws c10::Error unless `slice` fits its cache and the rotary table.
  void CheckSlice(const SequenceSlice& slice) const;

  // Whether ForwardFloatCpu (node/cpu_block_forward.h) may run `slices` on
  // `hidden`: it needs a float32 CPU block without quantisation, no
  // autograd, contiguous float32 caches and at most kFloatCpuMaxTokens new
  // tokens per slice.
  bool CanRunFloatCpu(const at::Tensor& hidden,
                      const std::vector<SequenceSlice>& slices) const;

  int block_index_;
  int64_t hidden_size_;
  int64_t num_heads_;
  int64_t num_kv_heads_;
  int64_t head_dim_;
  double rms_norm_eps_;
  std::shared_ptr<const RotaryEmbedding> rotary_;

  // q, k and v projections stacked into one matrix, and gate and up
  // likewise, so that each takes one matmul. The norms are in the block's
  // dtype; the projections compute in it.
  at::Tensor input_layernorm_;           // [hidden]
  QuantizedLinear qkv_proj_;             // [(heads + 2 kv_heads) * head_dim, hidden]
  QuantizedLinear o_proj_;               // [hidden, heads * head_dim]
  at::Tensor post_attention_layernorm_;  // [hidden]
  QuantizedLinear gate_up_proj_;         // [2 * intermediate, hidden]
  QuantizedLinear down_proj_;            // [hidden, intermediate]
  // The projections transposed, for small float32 CPU blocks only (see
  // kTransposedCopyMaxBytes); null otherwise. Shared by copies of the
  // block, as its tensors are.
  std::shared_ptr<const TransposedProjections> transposed_;
};

}  // namespace pollen::node
