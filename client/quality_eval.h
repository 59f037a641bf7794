// Measures what a block precision (dtype and weight quantisation) costs in
// accuracy: the model runs teacher-forced over a text once with float32
// blocks and once with the chosen precision, in this process, and the two
// sets of next-token logits are compared.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "common/checkpoint.h"
#include "node/quantized_linear.h"

namespace pollen::client {

// The precision compared against float32 blocks. The embeddings, final norm
// and LM head run in float32 in both passes, as a client runs them.
struct BlockPrecision {
  at::ScalarType dtype = at::kFloat;
  node::Quantization quantization = node::Quantization::kNone;
  at::Device device = at::kCPU;
};

// The comparison. Every ratio and mean is over the `predictions` positions
// whose next token is known.
struct QualityReport {
  // Tokens of the text, BOS included, and next-token predictions scored
  // (tokens - 1).
  int64_t tokens = 0;
  int64_t predictions = 0;
  // Fraction of positions where both passes put the same token first.
  double top1_agreement = 0;
  // exp(mean negative log-likelihood of the text's next tokens).
  double perplexity_reference = 0;
  double perplexity = 0;
  // perplexity / perplexity_reference - 1.
  double perplexity_change = 0;
  // Over every position and vocabulary entry, in float32 logits.
  double max_abs_logit_diff = 0;
  double mean_abs_logit_diff = 0;
  // Bytes of all block weights as stored (BlockSpan::ParameterBytes).
  int64_t weight_bytes_reference = 0;
  int64_t weight_bytes = 0;
  // Prompt tokens per second through all blocks in each pass.
  double prefill_tokens_per_s_reference = 0;
  double prefill_tokens_per_s = 0;
};

// Runs `token_ids` (BOS first, at least 2 ids, each below vocab_size)
// through every block of `checkpoint`, once in float32 without quantisation
// and once in `precision`, and compares the logits. A text longer than
// max_position_embeddings runs in consecutive windows of that many tokens,
// each with a fresh KV cache, so predictions at the start of a window see
// only that window. The reference span is freed before the other one loads,
// and the reference logits (4 * predictions * vocab_size bytes) are kept
// meanwhile. Returns INVALID_ARGUMENT for bad ids or an unsupported dtype,
// the checkpoint's error for missing or misshaped tensors, and INTERNAL
// (RESOURCE_EXHAUSTED when out of memory) when libtorch fails.
absl::StatusOr<QualityReport> CompareBlockPrecision(
    const Checkpoint& checkpoint, const std::vector<int>& token_ids,
    const BlockPrecision& precision);

// Tokenises `text` with the checkpoint folder's tokenizer.model (BOS first)
// and runs CompareBlockPrecision. Returns INVALID_ARGUMENT when the text
// gives fewer than 2 tokens with BOS, and the tokenizer's error when
// tokenizer.model cannot be loaded.
absl::StatusOr<QualityReport> CompareBlockPrecisionOnText(
    const std::string& model_dir, const std::string& text,
    const BlockPrecision& precision);

}  // namespace pollen::client
