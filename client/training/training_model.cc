#include "client/training/training_model.h"

#include <cmath>
#include <limits>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "common/status_util.h"

namespace pollen::client {
namespace {

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

}  // namespace

absl::StatusOr<std::unique_ptr<TrainingModel>> TrainingModel::Load(
    const Checkpoint& checkpoint, at::Device device, bool load_blocks) {
  std::unique_ptr<TrainingModel> model(new TrainingModel());
  const ModelConfig& config = checkpoint.config();
  model->config_ = config;
  const int64_t hidden = config.hidden_size;

  // Head.
  POLLEN_ASSIGN_OR_RETURN(
      model->embed_tokens_,
      checkpoint.LoadTensor("model.embed_tokens.weight", at::kFloat, device,
                            {config.vocab_size, hidden}));
  POLLEN_ASSIGN_OR_RETURN(model->norm_,
                          checkpoint.LoadTensor("model.norm.weight", at::kFloat,
                                                device, {hidden}));
  if (config.tie_word_embeddings && !checkpoint.HasTensor("lm_head.weight")) {
    model->lm_head_ = model->embed_tokens_;
  } else {
    POLLEN_ASSIGN_OR_RETURN(
        model->lm_head_,
        checkpoint.LoadTensor("lm_head.weight", at::kFloat, device,
                              {config.vocab_size, hidden}));
  }

  // Blocks, in Hugging Face layout.
  const int64_t num_blocks = load_blocks ? config.num_hidden_layers : 0;
  for (int i = 0; i < num_blocks; ++i) {
    const std::string prefix = absl::StrCat("model.layers.", i, ".");
    Block block;
    POLLEN_ASSIGN_OR_RETURN(
        block.input_layernorm,
        checkpoint.LoadTensor(prefix + "input_layernorm.weight", at::kFloat,
                              device, {hidden}));
    POLLEN_ASSIGN_OR_RETURN(
        block.post_attention_layernorm,
        checkpoint.LoadTensor(prefix + "post_attention_layernorm.weight",
                              at::kFloat, device, {hidden}));
    for (const char* name : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      POLLEN_ASSIGN_OR_RETURN(auto shape, ProjectionShape(config, name));
      POLLEN_ASSIGN_OR_RETURN(
          block.projections[name],
          checkpoint.LoadTensor(absl::StrCat(prefix, "self_attn.", name,
                                             ".weight"),
                                at::kFloat, device,
                                {shape.second, shape.first}));
    }
    for (const char* name : {"gate_proj", "up_proj", "down_proj"}) {
      POLLEN_ASSIGN_OR_RETURN(auto shape, ProjectionShape(config, name));
      POLLEN_ASSIGN_OR_RETURN(
          block.projections[name],
          checkpoint.LoadTensor(absl::StrCat(prefix, "mlp.", name, ".weight"),
                                at::kFloat, device,
                                {shape.second, shape.first}));
    }
    model->blocks_.push_back(std::move(block));
  }

  // Rotary tables in rotate-half layout, computed in float64:
  // angle[p, j] = p * theta^(-2 (j mod d/2) / d).
  const int64_t d = config.head_dim;
  const at::Tensor exponents =
      at::arange(0, d, 2, at::kDouble) / static_cast<double>(d);
  const at::Tensor inverse_frequency = at::pow(config.rope_theta, -exponents);
  const at::Tensor positions =
      at::arange(config.max_position_embeddings, at::kDouble);
  const at::Tensor angles = at::outer(positions, inverse_frequency);
  const at::Tensor full = at::cat({angles, angles}, -1);
  model->cos_ = full.cos().to(device, at::kFloat);
  model->sin_ = full.sin().to(device, at::kFloat);
  return model;
}

at::Tensor TrainingModel::EmbedWithPrompt(const at::Tensor& token_ids,
                                          const AdapterSet& adapters) const {
  const at::Tensor embeddings =
      at::embedding(embed_tokens_, token_ids.to(device(), at::kLong));
  if (!adapters.prompt.defined()) return embeddings;
  const int64_t batch = token_ids.size(0);
  const at::Tensor prompt =
      adapters.prompt.unsqueeze(0).expand({batch, -1, -1});
  return at::cat({prompt, embeddings}, 1);
}

at::Tensor TrainingModel::RmsNorm(const at::Tensor& x,
                                  const at::Tensor& weight) const {
  const at::Tensor variance = x.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (x * at::rsqrt(variance + config_.rms_norm_eps));
}

at::Tensor TrainingModel::Project(const at::Tensor& x, int block,
                                  const std::string& name,
                                  const AdapterSet& adapters) const {
  at::Tensor y = at::linear(x, blocks_[block].projections.at(name));
  const auto block_lora = adapters.lora.find(block);
  if (block_lora == adapters.lora.end()) return y;
  const auto pair = block_lora->second.find(name);
  if (pair == block_lora->second.end()) return y;
  return y + at::linear(at::linear(x, pair->second.a), pair->second.b) *
                 adapters.LoraScaling();
}

at::Tensor TrainingModel::RunBlock(const at::Tensor& input, int block,
                                   const AdapterSet& adapters) const {
  const Block& weights = blocks_[block];
  at::Tensor hidden = input;
  const int64_t batch = hidden.size(0);
  const int64_t seq = hidden.size(1);

  // Deep prompt: added to the first prefix positions.
  if (adapters.deep_prompt.defined()) {
    const int64_t prefix = adapters.deep_prompt.size(1);
    TORCH_CHECK(seq >= prefix, "sequence of ", seq,
                " positions is shorter than the deep prompt of ", prefix);
    const at::Tensor padded = at::constant_pad_nd(
        adapters.deep_prompt[block], {0, 0, 0, seq - prefix});
    hidden = hidden + padded.unsqueeze(0);
  }

  // Attention: q [batch, heads, seq, d], k and v [batch, kv_heads, seq, d].
  const int64_t heads = config_.num_attention_heads;
  const int64_t kv_heads = config_.num_key_value_heads;
  const int64_t d = config_.head_dim;
  const at::Tensor x = RmsNorm(hidden, weights.input_layernorm);
  at::Tensor q = Project(x, block, "q_proj", adapters)
                     .view({batch, seq, heads, d})
                     .transpose(1, 2);
  at::Tensor k = Project(x, block, "k_proj", adapters)
                     .view({batch, seq, kv_heads, d})
                     .transpose(1, 2);
  at::Tensor v = Project(x, block, "v_proj", adapters)
                     .view({batch, seq, kv_heads, d})
                     .transpose(1, 2);
  const at::Tensor cos = cos_.narrow(0, 0, seq);
  const at::Tensor sin = sin_.narrow(0, 0, seq);
  q = q * cos + RotateHalf(q) * sin;
  k = k * cos + RotateHalf(k) * sin;

  // Grouped-query attention: query head h reads kv head h / group.
  const int64_t group = heads / kv_heads;
  k = k.repeat_interleave(group, 1);
  v = v.repeat_interleave(group, 1);
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) /
                      std::sqrt(static_cast<double>(d));
  const at::Tensor future = at::ones({seq, seq}, at::TensorOptions()
                                                     .dtype(at::kBool)
                                                     .device(device()))
                                .triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
  const at::Tensor attention =
      at::matmul(at::softmax(scores, -1), v)
          .transpose(1, 2)
          .reshape({batch, seq, heads * d});
  hidden = hidden + Project(attention, block, "o_proj", adapters);

  // SwiGLU MLP.
  const at::Tensor y = RmsNorm(hidden, weights.post_attention_layernorm);
  const at::Tensor mlp =
      at::silu(Project(y, block, "gate_proj", adapters)) *
      Project(y, block, "up_proj", adapters);
  return hidden + Project(mlp, block, "down_proj", adapters);
}

at::Tensor TrainingModel::RunBlocks(const at::Tensor& hidden, int from, int to,
                                    const AdapterSet& adapters) const {
  const int loaded = static_cast<int>(blocks_.size());
  TORCH_CHECK(0 <= from && from < to && to <= loaded, "blocks [", from, ", ",
              to, ") outside the ", loaded, " loaded blocks");
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(2) == config_.hidden_size,
              "hidden states have shape ", hidden.sizes(),
              ", expected [batch, seq, ", config_.hidden_size, "]");
  at::Tensor output = hidden.to(device(), at::kFloat);
  for (int block = from; block < to; ++block) {
    output = RunBlock(output, block, adapters);
  }
  return output;
}

at::Tensor TrainingModel::Logits(const at::Tensor& hidden) const {
  return at::linear(RmsNorm(hidden.to(device(), at::kFloat), norm_), lm_head_);
}

at::Tensor TrainingModel::Logits(const at::Tensor& hidden,
                                 const AdapterSet& adapters) const {
  if (!adapters.lm_head.defined()) return Logits(hidden);
  return at::linear(RmsNorm(hidden.to(device(), at::kFloat), adapters.norm),
                    adapters.lm_head);
}

at::Tensor TrainingModel::Loss(const at::Tensor& logits,
                               const at::Tensor& token_ids,
                               const at::Tensor& mask, int64_t prefix_length) {
  // Position prefix + t - 1 predicts token t, for t in [1, seq).
  const int64_t seq = token_ids.size(1);
  const at::Tensor predictions = logits.narrow(1, prefix_length, seq - 1);
  const at::Tensor targets = token_ids.narrow(1, 1, seq - 1).to(
      logits.device(), at::kLong);
  const at::Tensor weights =
      mask.narrow(1, 1, seq - 1).to(logits.device(), at::kFloat);
  const at::Tensor token_losses =
      at::cross_entropy_loss(predictions.reshape({-1, logits.size(-1)}),
                             targets.reshape({-1}), /*weight=*/{},
                             at::Reduction::None)
          .view_as(weights);
  return (token_losses * weights).sum() / weights.sum().clamp_min(1);
}

at::Tensor TrainingModel::ComputeLoss(const at::Tensor& token_ids,
                                      const at::Tensor& mask,
                                      const AdapterSet& adapters) const {
  const at::Tensor hidden = RunBlocks(EmbedWithPrompt(token_ids, adapters), 0,
                                      config_.num_hidden_layers, adapters);
  return Loss(Logits(hidden, adapters), token_ids, mask,
              adapters.PrefixLength());
}

}  // namespace pollen::client
