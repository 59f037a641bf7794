#include "client/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::client {
namespace {

// A token id with its unnormalized probability.
struct Candidate {
  double weight;
  int id;
};

// Higher weight first, then lower id, so that the order and the draw do not
// depend on the sort algorithm.
bool HigherWeight(const Candidate& a, const Candidate& b) {
  if (a.weight != b.weight) return a.weight > b.weight;
  return a.id < b.id;
}

// Returns a uniform double in [0, 1) built from the top 53 bits of one
// generator output.
double UniformDouble(std::mt19937_64& generator) {
  constexpr double kTwoToMinus53 = 1.0 / 9007199254740992.0;
  return static_cast<double>(generator() >> 11) * kTwoToMinus53;
}

// Copies `logits` ([vocab], or [1, ..., 1, vocab]) to a float32 vector.
absl::StatusOr<std::vector<float>> CopyLogitsToCpu(const at::Tensor& logits) {
  if (!logits.defined()) {
    return absl::InvalidArgumentError("logits tensor is undefined");
  }
  if (!at::isFloatingType(logits.scalar_type())) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits dtype ", std::string(c10::toString(
                                          logits.scalar_type())),
                     " is not a floating-point type"));
  }
  if (logits.dim() == 0 || logits.numel() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits shape [", absl::StrJoin(logits.sizes(), ", "),
                     "] holds no vocabulary dimension; expected [vocab]"));
  }
  for (int64_t dim = 0; dim + 1 < logits.dim(); ++dim) {
    if (logits.size(dim) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("logits shape [", absl::StrJoin(logits.sizes(), ", "),
                       "] holds more than one row; expected [vocab]"));
    }
  }
  if (logits.numel() > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits hold ", logits.numel(),
                     " entries, more than token ids of type int can index"));
  }

  std::vector<float> values;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      "copying logits to the CPU", [&]() -> absl::Status {
        const at::Tensor cpu =
            logits.reshape({-1}).to(at::kCPU, at::kFloat).contiguous();
        const float* data = cpu.data_ptr<float>();
        values.assign(data, data + cpu.numel());
        return absl::OkStatus();
      }));
  return values;
}

// Applies the CTRL repetition penalty once to each distinct id in `history`.
void ApplyRepetitionPenalty(float penalty, const std::vector<int>& history,
                            std::vector<float>& logits) {
  std::vector<bool> seen(logits.size(), false);
  for (const int id : history) {
    if (id < 0 || static_cast<size_t>(id) >= logits.size() || seen[id]) {
      continue;
    }
    seen[id] = true;
    float& logit = logits[id];
    logit = logit > 0 ? logit / penalty : logit * penalty;
  }
}

// Returns the index of the largest logit, the lowest index on ties, or -1
// when every logit is NaN or -inf.
int Argmax(const std::vector<float>& logits) {
  int best = -1;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float logit = logits[i];
    if (std::isnan(logit) || logit == -std::numeric_limits<float>::infinity()) {
      continue;
    }
    if (best < 0 || logit > logits[best]) best = static_cast<int>(i);
  }
  return best;
}

// Returns exp((logit - max) / temperature) for every id with a nonzero
// result. When the maximum is +inf, the +inf logits share all the weight.
std::vector<Candidate> SoftmaxWeights(const std::vector<float>& logits,
                                      float max_logit, float temperature) {
  std::vector<Candidate> candidates;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float logit = logits[i];
    if (std::isnan(logit)) continue;

    double weight;
    if (std::isinf(max_logit)) {
      weight = logit == max_logit ? 1.0 : 0.0;
    } else {
      weight = std::exp((static_cast<double>(logit) - max_logit) /
                        static_cast<double>(temperature));
    }
    if (weight > 0) candidates.push_back({weight, static_cast<int>(i)});
  }
  return candidates;
}

// Keeps the smallest prefix of `candidates` (sorted by HigherWeight) whose
// weights sum to at least `top_p` of the total, and at least one candidate.
void KeepTopP(float top_p, std::vector<Candidate>& candidates) {
  double total = 0;
  for (const Candidate& candidate : candidates) total += candidate.weight;

  const double threshold = static_cast<double>(top_p) * total;
  double cumulative = 0;
  size_t kept_count = 0;
  while (kept_count < candidates.size()) {
    cumulative += candidates[kept_count].weight;
    ++kept_count;
    if (cumulative >= threshold) break;
  }
  candidates.resize(kept_count);
}

// Draws one candidate with probability proportional to its weight.
int Draw(const std::vector<Candidate>& candidates,
         std::mt19937_64& generator) {
  double total = 0;
  for (const Candidate& candidate : candidates) total += candidate.weight;

  const double target = UniformDouble(generator) * total;
  double cumulative = 0;
  for (const Candidate& candidate : candidates) {
    cumulative += candidate.weight;
    if (target < cumulative) return candidate.id;
  }
  // Rounding can leave `target` at or above the final sum.
  return candidates.back().id;
}

SamplingOptions SanitizeOptions(const SamplingOptions& options) {
  SamplingOptions sanitized = options;
  if (!(std::isfinite(options.temperature) && options.temperature >= 0)) {
    POLLEN_LOG_WARN("Sampling temperature {} is invalid; using 0 (greedy)",
                    options.temperature);
    sanitized.temperature = 0;
  }
  if (options.top_k < 0) {
    POLLEN_LOG_WARN("Sampling top_k {} is invalid; using 0 (off)",
                    options.top_k);
    sanitized.top_k = 0;
  }
  if (!(options.top_p > 0 && options.top_p <= 1)) {
    POLLEN_LOG_WARN("Sampling top_p {} is invalid; using 1 (off)",
                    options.top_p);
    sanitized.top_p = 1;
  }
  if (!(std::isfinite(options.repetition_penalty) &&
        options.repetition_penalty > 0)) {
    POLLEN_LOG_WARN("Sampling repetition_penalty {} is invalid; using 1 (off)",
                    options.repetition_penalty);
    sanitized.repetition_penalty = 1;
  }
  return sanitized;
}

}  // namespace

absl::Status ValidateSamplingOptions(const SamplingOptions& options) {
  if (!(std::isfinite(options.temperature) && options.temperature >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "temperature ", options.temperature,
        " is invalid; it must be finite and >= 0 (0 selects greedy decoding)"));
  }
  if (options.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_k ", options.top_k, " is invalid; it must be >= 0 (0 is off)"));
  }
  if (!(options.top_p > 0 && options.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_p ", options.top_p, " is outside (0, 1]; 1 turns it off"));
  }
  if (!(std::isfinite(options.repetition_penalty) &&
        options.repetition_penalty > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "repetition_penalty ", options.repetition_penalty,
        " is invalid; it must be finite and > 0 (1 is off)"));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingOptions& options)
    : options_(SanitizeOptions(options)), generator_(options.seed) {}

int Sampler::Sample(const at::Tensor& logits,
                    const std::vector<int>& history) {
  absl::StatusOr<std::vector<float>> copied = CopyLogitsToCpu(logits);
  if (!copied.ok()) {
    POLLEN_LOG_ERROR("Sampler cannot use the logits: {}",
                     copied.status().ToString());
    return -1;
  }
  std::vector<float>& values = *copied;  // [vocab]

  // Penalize repeats.
  if (options_.repetition_penalty != 1.0f) {
    ApplyRepetitionPenalty(options_.repetition_penalty, history, values);
  }

  // Greedy decoding, and the maximum that the softmax subtracts.
  const int best = Argmax(values);
  if (best < 0) {
    POLLEN_LOG_ERROR("Sampler got {} logits that are all NaN or -inf",
                     values.size());
    return -1;
  }
  if (options_.temperature == 0) return best;

  // Temperature and softmax, in double precision.
  std::vector<Candidate> candidates =
      SoftmaxWeights(values, values[best], options_.temperature);

  // Top-k, then top-p over the kept tokens. Both need the candidates ordered
  // by weight. Without either, the draw walks them in id order.
  const size_t top_k = static_cast<size_t>(options_.top_k);
  if (top_k > 0 && top_k < candidates.size()) {
    std::partial_sort(candidates.begin(), candidates.begin() + top_k,
                      candidates.end(), HigherWeight);
    candidates.resize(top_k);
  } else if (top_k > 0 || options_.top_p < 1) {
    std::sort(candidates.begin(), candidates.end(), HigherWeight);
  }
  if (options_.top_p < 1) KeepTopP(options_.top_p, candidates);

  // The best logit has weight 1, so at least one candidate remains.
  return Draw(candidates, generator_);
}

}  // namespace pollen::client
