// Next-token selection from logits: greedy, temperature, top-k, top-p and a
// repetition penalty.
#pragma once

#include <random>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "pollen/client.h"

namespace pollen::client {

// The options struct of the public client API (pollen/client.h), under the
// name the client library uses.
using SamplingOptions = ::pollen::SamplingOptions;

// Returns INVALID_ARGUMENT naming the first option outside its range:
// temperature finite and >= 0, top_k >= 0, top_p in (0, 1], and
// repetition_penalty finite and > 0.
absl::Status ValidateSamplingOptions(const SamplingOptions& options);

// Picks next tokens from logits.
//
// The steps run in this order: repetition penalty, then argmax when
// temperature is 0, otherwise temperature, top-k, top-p and a draw from the
// remaining tokens. Deterministic for a given seed and sequence of calls: the
// draw turns one 64-bit output of std::mt19937_64 into a uniform double
// itself instead of using a standard library distribution, whose algorithm
// differs between implementations.
//
// Not thread-safe: each Sample call advances the random generator.
class Sampler {
 public:
  // An option outside the range that ValidateSamplingOptions enforces is
  // replaced by the value that turns its step off (temperature 0, top_k 0,
  // top_p 1, repetition_penalty 1), with a warning in the log.
  explicit Sampler(const SamplingOptions& options);

  // Returns the id of the next token. Returns -1, and logs why, when `logits`
  // is not a non-empty floating-point tensor of shape [vocab] (leading
  // dimensions of size 1 are accepted) or every logit is NaN or -inf. NaN
  // logits never win.
  //
  // logits: [vocab], any floating dtype, any device; it is copied to the CPU
  // as float32. history: ids seen so far (prompt and generated) for the
  // repetition penalty; ids outside [0, vocab) are ignored.
  int Sample(const at::Tensor& logits, const std::vector<int>& history);

  const SamplingOptions& options() const { return options_; }

 private:
  SamplingOptions options_;
  std::mt19937_64 generator_;
};

}  // namespace pollen::client
