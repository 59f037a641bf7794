#include "client/model_head.h"

#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "common/cpu_matmul.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::client {
namespace {

// Concurrent Logits calls share one LM head product only when the head
// has at least this many bytes. A smaller head stays in the CPU caches, so
// its product takes a few microseconds, less than waiting for another
// thread's product and waking up.
constexpr int64_t kSharedHeadMinBytes = int64_t{4} << 20;

// Returns the transposed copy that ModelHead keeps of `lm_head`, or
// nothing for a head that does not get one.
std::optional<TransposedWeight> TransposedHead(const at::Tensor& lm_head) {
  if (!lm_head.is_cpu() || lm_head.scalar_type() != at::kFloat ||
      lm_head.dim() != 2 ||
      static_cast<int64_t>(lm_head.nbytes()) >= kSharedHeadMinBytes) {
    return std::nullopt;
  }
  return TransposeForMatMul(lm_head);
}

}  // namespace

ModelHead::ModelHead(ModelConfig config, at::Tensor embed_tokens,
                     at::Tensor norm, at::Tensor lm_head)
    : config_(std::move(config)),
      embed_tokens_(std::move(embed_tokens)),
      norm_(std::move(norm)),
      lm_head_(std::move(lm_head)),
      lm_head_transposed_(TransposedHead(lm_head_)) {}

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
  const bool float_cpu = embed_tokens_.scalar_type() == at::kFloat &&
                         embed_tokens_.is_cpu() &&
                         embed_tokens_.is_contiguous() &&
                         token_ids.scalar_type() == at::kLong &&
                         token_ids.is_cpu() && token_ids.is_contiguous();
  if (!float_cpu) {
    return at::embedding(embed_tokens_, token_ids.to(device(), at::kLong));
  }

  // A decode step embeds one token: copying its row costs less than
  // at::embedding's operators.
  const int64_t vocab = embed_tokens_.size(0);
  const int64_t hidden = embed_tokens_.size(1);
  std::vector<int64_t> sizes(token_ids.sizes().begin(), token_ids.sizes().end());
  sizes.push_back(hidden);
  at::Tensor output = at::empty(sizes, embed_tokens_.options());
  const int64_t* ids = token_ids.data_ptr<int64_t>();
  const float* table = embed_tokens_.data_ptr<float>();
  float* rows = output.data_ptr<float>();
  for (int64_t i = 0; i < token_ids.numel(); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < vocab, "token id ", ids[i],
                " is out of range [0, ", vocab, ")");
    std::memcpy(rows + i * hidden, table + ids[i] * hidden,
                hidden * sizeof(float));
  }
  return output;
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

  // Final RMSNorm with float32 statistics, as in the blocks. Float32 on
  // the CPU takes a plain loop, which costs less than the libtorch
  // operators of the general path in a decode step.
  at::Tensor normed;
  if (hidden.is_cpu() && hidden.scalar_type() == at::kFloat &&
      norm_.is_cpu() && dtype() == at::kFloat) {
    const at::Tensor x = hidden.contiguous();
    normed = at::empty(x.sizes(), x.options());
    RmsNormRows(x.data_ptr<float>(), norm_.data_ptr<float>(),
                x.numel() / config_.hidden_size, config_.hidden_size,
                static_cast<float>(config_.rms_norm_eps),
                normed.data_ptr<float>());
  } else {
    const at::Tensor x = hidden.to(device(), dtype());
    const at::Tensor x32 = x.to(at::kFloat);
    const at::Tensor variance = x32.pow(2).mean(-1, /*keepdim=*/true);
    normed = norm_ * (x32 * at::rsqrt(variance + config_.rms_norm_eps)).to(dtype());
  }

  // A decode step's few rows read the large LM head once in tiled loops;
  // BLAS would first copy (pack) the whole matrix. The loops give each row
  // the same result whatever rows share the product, so concurrent calls
  // can share it.
  const int64_t rows = normed.numel() / config_.hidden_size;
  if (normed.is_cpu() && normed.scalar_type() == at::kFloat &&
      lm_head_.scalar_type() == at::kFloat && rows >= 1 &&
      rows <= kLoopMatMulMaxRows) {
    std::vector<int64_t> sizes(normed.sizes().begin(), normed.sizes().end());
    sizes.back() = lm_head_.size(0);
    if (lm_head_transposed_.has_value()) {
      const at::Tensor input = normed.contiguous();
      at::Tensor product = at::empty(sizes, input.options());
      MatMulTransposed(input.data_ptr<float>(), rows, *lm_head_transposed_,
                       product.data_ptr<float>());
      return product;
    }
    const at::Tensor flat = normed.reshape({rows, config_.hidden_size});
    const at::Tensor product = lm_head_.nbytes() >= kSharedHeadMinBytes
                                   ? SharedHeadProduct(flat)
                                   : LinearFewRows(flat, lm_head_);
    return product.view(sizes);
  }
  return LinearFewRows(normed, lm_head_).to(at::kFloat);
}

struct ModelHead::HeadRequest {
  at::Tensor rows;    // [n, hidden]
  at::Tensor logits;  // [n, vocab] once done
  std::exception_ptr error;
  bool done = false;
};

at::Tensor ModelHead::SharedHeadProduct(const at::Tensor& rows) const {
  HeadRequest request;
  request.rows = rows.contiguous();
  {
    absl::MutexLock lock(&mu_);
    waiting_.push_back(&request);
    if (running_) {
      // Another thread computes it.
      mu_.Await(absl::Condition(&request.done));
      if (request.error) std::rethrow_exception(request.error);
      return request.logits;
    }
    running_ = true;
  }

  // This thread computes products until no call waits: each takes the
  // waiting rows, oldest first, up to the rows the tiled loops take.
  while (true) {
    std::vector<HeadRequest*> group;
    {
      absl::MutexLock lock(&mu_);
      if (waiting_.empty()) {
        running_ = false;
        break;
      }
      int64_t total = 0;
      size_t taken = 0;
      while (taken < waiting_.size()) {
        const int64_t n = waiting_[taken]->rows.size(0);
        if (taken > 0 && total + n > kLoopMatMulMaxRows) break;
        total += n;
        ++taken;
      }
      group.assign(waiting_.begin(), waiting_.begin() + taken);
      waiting_.erase(waiting_.begin(), waiting_.begin() + taken);
    }

    std::vector<at::Tensor> outputs;
    std::exception_ptr error;
    try {
      std::vector<at::Tensor> inputs;
      for (HeadRequest* member : group) inputs.push_back(member->rows);
      const at::Tensor product =
          LinearFewRows(inputs.size() == 1 ? inputs[0] : at::cat(inputs), lm_head_);
      int64_t offset = 0;
      for (HeadRequest* member : group) {
        const int64_t n = member->rows.size(0);
        outputs.push_back(product.narrow(0, offset, n));
        offset += n;
      }
    } catch (...) {
      error = std::current_exception();
    }

    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < group.size(); ++i) {
      if (error) {
        group[i]->error = error;
      } else {
        group[i]->logits = std::move(outputs[i]);
      }
      group[i]->done = true;
    }
  }

  if (request.error) std::rethrow_exception(request.error);
  return request.logits;
}

}  // namespace pollen::client
