#include "client/quality_eval.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/model_head.h"
#include "client/tokenizer.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/block_span.h"

namespace pollen::client {
namespace {

// One pass over the text: the logits of every position with a next token,
// float32 [predictions, vocab] on the CPU, and the time the blocks took.
struct PassResult {
  at::Tensor logits;
  double block_seconds = 0;
  int64_t weight_bytes = 0;
};

// Runs the first `tokens` ids through every block of `span` once, untimed,
// so that one-time setup (thread pools, kernel choice) does not count.
absl::Status WarmUp(const node::BlockSpan& span, const ModelHead& head,
                    const at::Tensor& ids, int64_t tokens) {
  const int num_blocks = span.end();
  at::Tensor hidden;
  std::vector<node::LayerKvCache> cache;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("preparing the warm-up pass", [&] {
    at::NoGradGuard no_grad;
    hidden = head.Embed(ids.narrow(0, 0, tokens).unsqueeze(0));
    cache = span.AllocateCache(0, num_blocks, 1, tokens);
    return absl::OkStatus();
  }));
  return span.Forward(hidden, cache, 0, 0, num_blocks).status();
}

// Runs `ids` (int64 [tokens] on the CPU) through every block of a span
// loaded in `precision`, window by window, and through `head`.
absl::StatusOr<PassResult> RunPass(const Checkpoint& checkpoint,
                                   const ModelHead& head, const at::Tensor& ids,
                                   const BlockPrecision& precision) {
  const ModelConfig& config = checkpoint.config();
  const int num_blocks = static_cast<int>(config.num_hidden_layers);
  POLLEN_ASSIGN_OR_RETURN(
      std::unique_ptr<node::BlockSpan> span,
      node::BlockSpan::Load(checkpoint, 0, num_blocks, precision.dtype,
                            precision.device, precision.quantization));
  POLLEN_RETURN_IF_ERROR(
      WarmUp(*span, head, ids,
             std::min<int64_t>({8, ids.size(0), config.max_position_embeddings})));

  PassResult result;
  result.weight_bytes = span->ParameterBytes();
  const int64_t total = ids.size(0);
  const int64_t window = config.max_position_embeddings;
  std::vector<at::Tensor> parts;
  for (int64_t start = 0; start < total - 1; start += window) {
    const int64_t length = std::min(window, total - start);

    // Embeddings, a fresh KV cache and one prefill pass of the window.
    at::Tensor hidden;
    std::vector<node::LayerKvCache> cache;
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("embedding tokens [", start, ", ", start + length,
                     ") and allocating their KV cache"),
        [&] {
          at::NoGradGuard no_grad;
          hidden = head.Embed(ids.narrow(0, start, length).unsqueeze(0));
          cache = span->AllocateCache(0, num_blocks, 1, length);
          return absl::OkStatus();
        }));
    const absl::Time started = absl::Now();
    POLLEN_ASSIGN_OR_RETURN(const at::Tensor output,
                            span->Forward(hidden, cache, 0, 0, num_blocks));
    result.block_seconds += absl::ToDoubleSeconds(absl::Now() - started);

    // The text's last token predicts nothing.
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("computing the logits of tokens [", start, ", ",
                     start + length, ")"),
        [&] {
          at::NoGradGuard no_grad;
          at::Tensor logits = head.Logits(output)[0];  // [length, vocab]
          if (start + length == total) logits = logits.narrow(0, 0, length - 1);
          parts.push_back(logits.to(at::kCPU));
          return absl::OkStatus();
        }));
  }
  result.logits = at::cat(parts, 0);
  return result;
}

// exp(mean negative log-likelihood of `targets` [n] under `logits`
// [n, vocab]), in float64.
double Perplexity(const at::Tensor& logits, const at::Tensor& targets) {
  const at::Tensor log_probs = at::log_softmax(logits.to(at::kDouble), -1);
  const double mean_nll =
      -log_probs.gather(1, targets.unsqueeze(1)).mean().item<double>();
  return std::exp(mean_nll);
}

}  // namespace

absl::StatusOr<QualityReport> CompareBlockPrecision(
    const Checkpoint& checkpoint, const std::vector<int>& token_ids,
    const BlockPrecision& precision) {
  const ModelConfig& config = checkpoint.config();
  if (token_ids.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the text has ", token_ids.size(),
        " tokens with BOS; at least 2 are needed to predict one"));
  }
  for (size_t i = 0; i < token_ids.size(); ++i) {
    if (token_ids[i] < 0 || token_ids[i] >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token ", i, " has id ", token_ids[i], ", outside the vocabulary [0, ",
          config.vocab_size, ")"));
    }
  }
  POLLEN_LOG_INFO("comparing {} with quantization {} against float32 on {} "
                  "tokens of {}",
                  DtypeName(precision.dtype),
                  node::QuantizationName(precision.quantization),
                  token_ids.size(), checkpoint.dir());

  POLLEN_ASSIGN_OR_RETURN(
      const std::unique_ptr<ModelHead> head,
      ModelHead::Load(checkpoint, at::kFloat, precision.device));
  std::vector<int64_t> ids64(token_ids.begin(), token_ids.end());
  const at::Tensor ids = at::tensor(ids64, at::kLong);

  // The reference pass first; its span is freed when RunPass returns.
  BlockPrecision reference_precision;
  reference_precision.device = precision.device;
  POLLEN_ASSIGN_OR_RETURN(const PassResult reference,
                          RunPass(checkpoint, *head, ids, reference_precision));
  POLLEN_ASSIGN_OR_RETURN(const PassResult compared,
                          RunPass(checkpoint, *head, ids, precision));

  QualityReport report;
  report.tokens = static_cast<int64_t>(token_ids.size());
  report.predictions = report.tokens - 1;
  report.weight_bytes_reference = reference.weight_bytes;
  report.weight_bytes = compared.weight_bytes;
  const double tokens = static_cast<double>(report.tokens);
  report.prefill_tokens_per_s_reference =
      tokens / std::max(reference.block_seconds, 1e-9);
  report.prefill_tokens_per_s = tokens / std::max(compared.block_seconds, 1e-9);

  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("comparing the logits", [&] {
    at::NoGradGuard no_grad;
    const at::Tensor targets = ids.narrow(0, 1, report.predictions);
    const at::Tensor agree =
        reference.logits.argmax(-1) == compared.logits.argmax(-1);
    report.top1_agreement = agree.to(at::kDouble).mean().item<double>();
    report.perplexity_reference = Perplexity(reference.logits, targets);
    report.perplexity = Perplexity(compared.logits, targets);
    report.perplexity_change =
        report.perplexity / report.perplexity_reference - 1;
    const at::Tensor diff = (reference.logits - compared.logits).abs();
    report.max_abs_logit_diff = diff.max().item<double>();
    report.mean_abs_logit_diff = diff.to(at::kDouble).mean().item<double>();
    return absl::OkStatus();
  }));
  return report;
}

absl::StatusOr<QualityReport> CompareBlockPrecisionOnText(
    const std::string& model_dir, const std::string& text,
    const BlockPrecision& precision) {
  POLLEN_ASSIGN_OR_RETURN(const std::shared_ptr<const Checkpoint> checkpoint,
                          Checkpoint::Open(model_dir));
  POLLEN_ASSIGN_OR_RETURN(const std::unique_ptr<Tokenizer> tokenizer,
                          Tokenizer::Load(model_dir + "/tokenizer.model"));
  const std::vector<int> ids = tokenizer->Encode(text, /*add_bos=*/true);
  return CompareBlockPrecision(*checkpoint, ids, precision);
}

}  // namespace pollen::client
