#include "client/bench/greedy_decoder.h"

#include <chrono>
#include <cmath>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "common/status_util.h"

namespace pollen::bench {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

// A session over a whole-model span in this process: its cache and the
// number of positions it holds.
struct LocalSession {
  std::shared_ptr<const node::BlockSpan> span;
  std::vector<node::LayerKvCache> cache;
  int64_t position = 0;
};

}  // namespace

absl::StatusOr<BlockRunner> MakeLocalBlockRunner(
    std::shared_ptr<const node::BlockSpan> span, int64_t max_length) {
  const int num_blocks = static_cast<int>(span->config().num_hidden_layers);
  if (span->start() != 0 || span->end() != num_blocks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a local runner needs every block 0:", num_blocks,
        "; the span contains blocks ", span->start(), ":", span->end()));
  }
  auto session = std::make_shared<LocalSession>();
  session->span = std::move(span);
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("allocating a KV cache of ", max_length, " positions"), [&] {
        session->cache = session->span->AllocateCache(0, num_blocks, 1, max_length);
        return absl::OkStatus();
      }));
  if (session->cache.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot allocate a KV cache of ", max_length, " positions"));
  }

  return BlockRunner(
      [session, num_blocks](const at::Tensor& hidden) -> absl::StatusOr<at::Tensor> {
        POLLEN_ASSIGN_OR_RETURN(
            at::Tensor output,
            session->span->Forward(hidden, session->cache, session->position,
                                   0, num_blocks));
        session->position += hidden.size(1);
        return output;
      });
}

GreedyDecoder::GreedyDecoder(const client::ModelHead& head,
                             BlockRunner run_blocks)
    : head_(head), run_blocks_(std::move(run_blocks)) {}

absl::Status GreedyDecoder::Prefill(const std::vector<int>& prompt_ids) {
  if (!new_ids_.empty()) {
    return absl::FailedPreconditionError("the prompt was fed already");
  }
  if (prompt_ids.empty()) {
    return absl::InvalidArgumentError("the prompt has no tokens");
  }
  const int64_t vocab_size = head_.config().vocab_size;
  for (const int id : prompt_ids) {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " is outside the vocabulary 0..",
          vocab_size - 1));
    }
  }

  const auto started = std::chrono::steady_clock::now();
  POLLEN_ASSIGN_OR_RETURN(const int next, Step(prompt_ids));
  prefill_seconds_ = SecondsSince(started);
  new_ids_.push_back(next);
  return absl::OkStatus();
}

absl::Status GreedyDecoder::Decode(int steps) {
  if (new_ids_.empty()) {
    return absl::FailedPreconditionError("decoding needs a prefill first");
  }
  for (int i = 0; i < steps; ++i) {
    const auto started = std::chrono::steady_clock::now();
    POLLEN_ASSIGN_OR_RETURN(const int next, Step({new_ids_.back()}));
    decode_seconds_ += SecondsSince(started);
    ++decode_steps_;
    new_ids_.push_back(next);
  }
  return absl::OkStatus();
}

absl::Status GreedyDecoder::Append(int id, double seconds) {
  if (new_ids_.empty()) {
    return absl::FailedPreconditionError("decoding needs a prefill first");
  }
  decode_seconds_ += seconds;
  ++decode_steps_;
  new_ids_.push_back(id);
  return absl::OkStatus();
}

absl::StatusOr<int> GreedyDecoder::Step(const std::vector<int>& ids) {
  c10::InferenceMode inference_mode;
  const std::vector<int64_t> wide(ids.begin(), ids.end());
  at::Tensor hidden;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("embedding the input", [&] {
    hidden = head_.Embed(at::tensor(wide, at::kLong).reshape({1, -1}));
    return absl::OkStatus();
  }));

  POLLEN_ASSIGN_OR_RETURN(const at::Tensor output, run_blocks_(hidden));

  // Logits of the last position only: [vocab] in float32 on the CPU.
  at::Tensor logits;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("computing the logits", [&] {
    logits = head_.Logits(output.slice(1, -1))
                 .reshape({-1})
                 .to(at::kCPU, at::kFloat)
                 .contiguous();
    return absl::OkStatus();
  }));
  return GreedyPick(logits.data_ptr<float>(), logits.numel(),
                    static_cast<int>(new_ids_.size()));
}

absl::StatusOr<int> GreedyPick(const float* logits, int64_t vocab,
                               int token_index) {
  // The first largest logit wins, as in argmax, and a NaN anywhere fails.
  int64_t next = 0;
  float best = vocab > 0 ? logits[0] : std::nanf("");
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(logits[i])) {
      best = logits[i];
      next = i;
      break;
    }
    if (logits[i] > best) {
      best = logits[i];
      next = i;
    }
  }
  if (!std::isfinite(best)) {
    return absl::InternalError(absl::StrCat(
        "the logits after token ", token_index,
        " are not all finite; the weights make the activations overflow"));
  }
  return static_cast<int>(next);
}

}  // namespace pollen::bench
