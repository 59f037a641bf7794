// A differentiable, in-process Llama forward pass with adapters: the
// reference that swarm fine-tuning is checked against, and the engine of
// `pollen finetune --local`.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "absl/status/statusor.h"
#include "client/training/adapter_set.h"
#include "common/checkpoint.h"
#include "common/model_config.h"

namespace pollen::client {

// All weights of a checkpoint in float32 on one device, frozen
// (requires_grad false), with a forward pass that autograd can follow into
// the adapters. Unlike node::LlamaBlock it keeps no KV cache and recomputes
// attention over the whole sequence, which is what training needs.
// Immutable after Load; Forward calls are thread-compatible because
// autograd records into the caller's tensors only.
class TrainingModel {
 public:
  // Loads the head and, when `load_blocks` is true, every block. A model
  // without blocks is for clients whose blocks run in the swarm, so its
  // RunBlocks throws.
  static absl::StatusOr<std::unique_ptr<TrainingModel>> Load(
      const Checkpoint& checkpoint, at::Device device,
      bool load_blocks = true);

  TrainingModel(const TrainingModel&) = delete;
  TrainingModel& operator=(const TrainingModel&) = delete;

  const ModelConfig& config() const { return config_; }
  at::Device device() const { return embed_tokens_.device(); }
  const at::Tensor& embed_tokens() const { return embed_tokens_; }

  // int64 ids [batch, seq] -> [batch, prefix + seq, hidden]: the token
  // embeddings with the adapters' prompt (if any) in front.
  at::Tensor EmbedWithPrompt(const at::Tensor& token_ids,
                             const AdapterSet& adapters) const;

  // Runs blocks [from, to) on `hidden` [batch, seq, hidden] at positions
  // [0, seq), adding the deep prompt of each block to the first prefix
  // positions and applying LoRA. Returns [batch, seq, hidden]. Throws
  // c10::Error on a shape mismatch.
  at::Tensor RunBlocks(const at::Tensor& hidden, int from, int to,
                       const AdapterSet& adapters) const;

  // [batch, seq, hidden] -> float32 logits [batch, seq, vocab], through the
  // adapters' trained norm and LM head when they have them.
  at::Tensor Logits(const at::Tensor& hidden) const;
  at::Tensor Logits(const at::Tensor& hidden,
                    const AdapterSet& adapters) const;

  // The checkpoint's final norm [hidden] and LM head [vocab, hidden].
  const at::Tensor& norm() const { return norm_; }
  const at::Tensor& lm_head() const { return lm_head_; }

  // Mean next-token cross entropy. `logits` [batch, prefix + seq, vocab]
  // come from EmbedWithPrompt + RunBlocks + Logits, and `token_ids` and
  // `mask` are [batch, seq]. Every token t with mask[t] == 1 is predicted
  // from position prefix + t - 1.
  static at::Tensor Loss(const at::Tensor& logits, const at::Tensor& token_ids,
                         const at::Tensor& mask, int64_t prefix_length);

  // The whole pass: loss of `token_ids` [batch, seq] under `adapters`.
  at::Tensor ComputeLoss(const at::Tensor& token_ids, const at::Tensor& mask,
                         const AdapterSet& adapters) const;

 private:
  struct Block {
    at::Tensor input_layernorm;           // [hidden]
    // Projection name ("q_proj", ...) -> [out_features, in_features].
    std::map<std::string, at::Tensor> projections;
    at::Tensor post_attention_layernorm;  // [hidden]
  };

  TrainingModel() = default;

  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight) const;
  // x [..., in] -> [..., out] through block `block`'s `name` plus its LoRA.
  at::Tensor Project(const at::Tensor& x, int block, const std::string& name,
                     const AdapterSet& adapters) const;
  at::Tensor RunBlock(const at::Tensor& hidden, int block,
                      const AdapterSet& adapters) const;

  ModelConfig config_;
  at::Tensor embed_tokens_;  // [vocab, hidden]
  at::Tensor norm_;          // [hidden]
  at::Tensor lm_head_;       // [vocab, hidden]
  std::vector<Block> blocks_;
  at::Tensor cos_;  // [max_positions, head_dim]
  at::Tensor sin_;  // [max_positions, head_dim]
};

}  // namespace pollen::client
