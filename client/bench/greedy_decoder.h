// Timed greedy decoding for benchmarks, with the blocks either in this
// process or behind a chain of nodes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "client/model_head.h"
#include "node/block_span.h"

namespace pollen::bench {

// Runs hidden states [1, new_tokens, hidden] through every block of the
// model at the session's next positions and returns the last block's
// output of the same shape. Each call advances the session.
using BlockRunner =
    std::function<absl::StatusOr<at::Tensor>(const at::Tensor& hidden)>;

// Returns a runner over every block of `span`, which must cover the whole
// model, with its own KV cache of `max_length` positions. Returns
// INVALID_ARGUMENT when the span does not start at block 0 and end at the
// last block, and RESOURCE_EXHAUSTED or INTERNAL when the cache cannot be
// allocated.
absl::StatusOr<BlockRunner> MakeLocalBlockRunner(
    std::shared_ptr<const node::BlockSpan> span, int64_t max_length);

// Returns the index of the first largest of `logits` [vocab], as argmax
// does. Returns INTERNAL, naming the logits after `token_index` new
// tokens, when any value is not finite.
absl::StatusOr<int> GreedyPick(const float* logits, int64_t vocab,
                               int token_index);

// One greedy generation, timed in two phases: the prompt in one step
// (prefill), then one token per step (decode). Each phase's time covers
// the embedding, the blocks, the final norm and LM head, and the argmax.
// Not thread-safe; use one decoder per thread.
class GreedyDecoder {
 public:
  // `head` must outlive the decoder.
  GreedyDecoder(const client::ModelHead& head, BlockRunner run_blocks);

  // Runs `prompt_ids` through the blocks in one step and picks the first
  // new token. Returns INVALID_ARGUMENT for an empty prompt or an id
  // outside the vocabulary, FAILED_PRECONDITION when called twice,
  // INTERNAL when the logits are not finite, and the runner's errors.
  absl::Status Prefill(const std::vector<int>& prompt_ids);

  // Runs `steps` decode steps, each feeding the last new token and
  // picking the next. Requires Prefill first (FAILED_PRECONDITION).
  absl::Status Decode(int steps);

  // Records `id` as the pick of one decode step that took `seconds`, for a
  // caller that runs the blocks and LM head of several decoders at once.
  // Requires Prefill first (FAILED_PRECONDITION).
  absl::Status Append(int id, double seconds);

  // Tokens picked so far: one from Prefill, then one per decode step.
  const std::vector<int>& new_ids() const { return new_ids_; }
  double prefill_seconds() const { return prefill_seconds_; }
  // Total over every Decode call.
  double decode_seconds() const { return decode_seconds_; }
  int decode_steps() const { return decode_steps_; }

 private:
  // Runs `ids` [1, n] through embedding, blocks and head and returns the
  // greedy pick after the last one.
  absl::StatusOr<int> Step(const std::vector<int>& ids);

  const client::ModelHead& head_;
  const BlockRunner run_blocks_;
  std::vector<int> new_ids_;
  double prefill_seconds_ = 0;
  double decode_seconds_ = 0;
  int decode_steps_ = 0;
};

}  // namespace pollen::bench
