#include "client/model_head.h"

#include <utility>

#include <ATen/ATen.h>

#include "common/cpu_matmul.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::client {

ModelHead::ModelHead(ModelConfig config, at::Tensor embed_tokens,
                     at::Tensor norm, at::Tensor lm_head)
    : config_(std::move(config)),
      embed_tokens_(std::move(embed_tokens)),
      norm_(std::move(norm)),
      lm_head_(std::move(lm_head)) {}

absl::StatusOr<std::unique_ptr<ModelHead>> ModelHead::Load(
    const Checkpoint& checkpoint, at::ScalarType dtype, at::Device device) {
  const ModelConfig& config = checkpoint.config();
  const std::vector<int64_t> table_shape = {config.vocab_size,
                                            config.hidden_size};

  POLLEN_ASSIGN_OR_RETURN(
      at::Tensor embed_tokens,
      checkpoint.LoadTensor("model.embed_tokens.weight", dtype, device,
                            table_shape));
  POLLEN_ASSIGN_OR_RETURN(
      at::Tensor norm, checkpoint.LoadTensor("model.norm.weight", dtype,
                                             device, {config.hidden_size}));
  // With tied embeddings the LM head is the embedding table, even when the
  // checkpoint also stores an lm_head.weight.
  at::Tensor lm_head = embed_tokens;
  if (!config.tie_word_embeddings) {
    POLLEN_ASSIGN_OR_RETURN(lm_head,
                            checkpoint.LoadTensor("lm_head.weight", dtype,
                                                  device, table_shape));
  }

  POLLEN_LOG_INFO("Loaded the model head of {} ({} x {}, {}tied) on {}",
                  checkpoint.dir(), config.vocab_size, config.hidden_size,
                  config.tie_word_embeddings ? "" : "not ", device.str());
  return std::unique_ptr<ModelHead>(new ModelHead(
      config, std::move(embed_tokens), std::move(norm), std::move(lm_head)));
}

at::Tensor ModelHead::Embed(const at::Tensor& token_ids) const {
  at::NoGradGuard no_grad;
  return at::embedding(embed_tokens_, token_ids.to(device(), at::kLong));
}

std::unique_ptr<ModelHead> ModelHead::WithHead(const ModelHead& base,
                                               const at::Tensor& norm,
                                               const at::Tensor& lm_head) {
  const int64_t hidden = base.config_.hidden_size;
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == hidden,
              "adapter norm has shape ", norm.sizes(), ", expected [", hidden,
              "]");
  TORCH_CHECK(lm_head.sizes() == base.lm_head_.sizes(),
              "adapter lm_head has shape ", lm_head.sizes(), ", expected ",
              base.lm_head_.sizes());
  const auto convert = [&](const at::Tensor& tensor) {
    return tensor.detach().to(base.device(), base.dtype()).contiguous();
  };
  return std::unique_ptr<ModelHead>(new ModelHead(
      base.config_, base.embed_tokens_, convert(norm), convert(lm_head)));
}

at::Tensor ModelHead::Logits(const at::Tensor& hidden) const {
  at::NoGradGuard no_grad;
  TORCH_CHECK(hidden.dim() >= 1 && hidden.size(-1) == config_.hidden_size,
              "hidden states have shape ", hidden.sizes(),
              ", expected [..., ", config_.hidden_size, "]");

  // Final RMSNorm with float32 statistics, as in the blocks.
  const at::Tensor x = hidden.to(device(), dtype());
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor variance = x32.pow(2).mean(-1, /*keepdim=*/true);
  const at::Tensor normed =
      norm_ * (x32 * at::rsqrt(variance + config_.rms_norm_eps)).to(dtype());

  // A decode step's few rows read the large LM head once in tiled loops;
  // BLAS would first copy (pack) the whole matrix.
  return LinearFewRows(normed, lm_head_).to(at::kFloat);
}

}  // namespace pollen::client
