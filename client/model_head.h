// The parts of a Llama model that the client runs itself.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/checkpoint.h"
#include "common/cpu_matmul.h"
#include "common/model_config.h"

namespace pollen::client {

// Token embeddings, final RMSNorm and LM head of a checkpoint, without any
// block weights. Its weights are immutable after Load, and it is
// thread-safe. Logits calls of a few rows from several threads at once
// (sessions generating side by side in one process) share one read of a
// large float32 LM head on the CPU; each gets the same logits as alone.
class ModelHead {
 public:
  // Loads model.embed_tokens.weight, model.norm.weight and lm_head.weight
  // (or, with tie_word_embeddings, the embeddings again in its place) as
  // `dtype` on `device`. Returns the checkpoint's error when one is missing
  // or misshaped.
  static absl::StatusOr<std::unique_ptr<ModelHead>> Load(
      const Checkpoint& checkpoint, at::ScalarType dtype, at::Device device);

  // Returns a head with the embeddings of `base` but another final norm
  // [hidden] and LM head [vocab, hidden], converted to base's dtype and
  // device; for adapters that train them. Throws c10::Error when a shape
  // differs.
  static std::unique_ptr<ModelHead> WithHead(const ModelHead& base,
                                             const at::Tensor& norm,
                                             const at::Tensor& lm_head);

  ModelHead(const ModelHead&) = delete;
  ModelHead& operator=(const ModelHead&) = delete;

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return embed_tokens_.scalar_type(); }
  at::Device device() const { return embed_tokens_.device(); }

  // int64 token ids [batch, seq] -> [batch, seq, hidden] in the head's dtype
  // on its device. The caller checks that ids are below vocab_size; an id
  // outside that range throws c10::Error.
  at::Tensor Embed(const at::Tensor& token_ids) const;

  // Hidden states [batch, seq, hidden] of any float dtype and device ->
  // float32 logits [batch, seq, vocab] on the head's device: final norm,
  // then the LM head. Throws c10::Error when the last dimension is not
  // hidden_size.
  at::Tensor Logits(const at::Tensor& hidden) const;

 private:
  // The rows of one Logits call, waiting for the LM head.
  struct HeadRequest;

  // Returns rows [n, hidden] times the LM head, [n, vocab], computed
  // together with the rows of concurrent calls. Throws c10::Error.
  at::Tensor SharedHeadProduct(const at::Tensor& rows) const;

  ModelHead(ModelConfig config, at::Tensor embed_tokens, at::Tensor norm,
            at::Tensor lm_head);

  const ModelConfig config_;
  const at::Tensor embed_tokens_;  // [vocab, hidden]
  const at::Tensor norm_;          // [hidden]
  // [vocab, hidden]; shares storage with embed_tokens_ when tied.
  const at::Tensor lm_head_;
  // lm_head_ transposed for MatMulTransposed, when it is float32 on the
  // CPU and smaller than the heads whose products are shared. The
  // products of such small heads are limited by arithmetic, which the
  // transposed form does with fewer instructions.
  const std::optional<TransposedWeight> lm_head_transposed_;

  mutable absl::Mutex mu_;
  // Calls waiting for the thread that computes the LM head products.
  mutable std::vector<HeadRequest*> waiting_ ABSL_GUARDED_BY(mu_);
  // Set while a thread computes them.
  mutable bool running_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace pollen::client
