#include "client/sampler.h"

#include <cmath>
#include <limits>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace pollen::client {
namespace {

at::Tensor Logits(const std::vector<float>& values) {
  return torch::tensor(values, torch::kFloat32);
}

// Logits whose softmax is `probabilities`.
at::Tensor LogitsFromProbabilities(const std::vector<float>& probabilities) {
  std::vector<float> logits;
  for (const float p : probabilities) logits.push_back(std::log(p));
  return Logits(logits);
}

SamplingOptions Sampling(float temperature, uint64_t seed) {
  SamplingOptions options;
  options.temperature = temperature;
  options.seed = seed;
  return options;
}

std::vector<int> DrawMany(Sampler& sampler, const at::Tensor& logits,
                          int count) {
  std::vector<int> ids;
  for (int i = 0; i < count; ++i) ids.push_back(sampler.Sample(logits, {}));
  return ids;
}

std::vector<double> Frequencies(const std::vector<int>& ids, int vocab) {
  std::vector<double> frequencies(vocab, 0.0);
  for (const int id : ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, vocab);
    if (id >= 0 && id < vocab) frequencies[id] += 1.0 / ids.size();
  }
  return frequencies;
}

TEST(Sampler, GreedyPicksArgmax) {
  Sampler sampler(SamplingOptions{});
  EXPECT_EQ(sampler.Sample(Logits({0.1f, 2.0f, -1.0f, 1.5f}), {}), 1);
  EXPECT_EQ(sampler.Sample(Logits({-3.0f, -2.0f, -5.0f}), {}), 1);
  EXPECT_EQ(sampler.Sample(Logits({7.0f}), {}), 0);
}

TEST(Sampler, GreedyTiePicksLowestId) {
  Sampler sampler(SamplingOptions{});
  EXPECT_EQ(sampler.Sample(Logits({1.0f, 3.0f, 3.0f, 2.0f}), {}), 1);
}

TEST(Sampler, GreedySkipsNan) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Sampler sampler(SamplingOptions{});
  EXPECT_EQ(sampler.Sample(Logits({nan, 1.0f, nan, 0.5f}), {}), 1);
}

TEST(Sampler, RepetitionPenaltyDividesPositive) {
  const at::Tensor logits = Logits({2.0f, 1.8f, 0.0f});
  SamplingOptions options;
  EXPECT_EQ(Sampler(options).Sample(logits, {0}), 0);

  // 2.0 / 1.5 = 1.33 falls below 1.8.
  options.repetition_penalty = 1.5f;
  EXPECT_EQ(Sampler(options).Sample(logits, {0}), 1);
  EXPECT_EQ(Sampler(options).Sample(logits, {}), 0);
}

TEST(Sampler, RepetitionPenaltyMultipliesNegative) {
  const at::Tensor logits = Logits({-1.0f, -1.2f});
  SamplingOptions options;
  options.repetition_penalty = 1.5f;

  // -1.0 * 1.5 = -1.5 falls below -1.2.
  EXPECT_EQ(Sampler(options).Sample(logits, {0}), 1);
}

TEST(Sampler, RepetitionPenaltyAppliesOncePerId) {
  // Applied twice, 3.0 would drop to 1.33 and lose to 2.0.
  const at::Tensor logits = Logits({3.0f, 2.0f});
  SamplingOptions options;
  options.repetition_penalty = 1.5f;
  EXPECT_EQ(Sampler(options).Sample(logits, {0, 0, 0}), 0);
}

TEST(Sampler, RepetitionPenaltyIgnoresOutOfRangeHistory) {
  SamplingOptions options;
  options.repetition_penalty = 2.0f;
  EXPECT_EQ(Sampler(options).Sample(Logits({1.0f, 2.0f}), {-1, 2, 99}), 1);
}

TEST(Sampler, RepetitionPenaltyBeforeSampling) {
  // Without the penalty, top_k = 1 keeps id 0. With it, id 1 wins.
  SamplingOptions options = Sampling(1.0f, 3);
  options.top_k = 1;
  options.repetition_penalty = 4.0f;
  Sampler sampler(options);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(sampler.Sample(Logits({4.0f, 2.0f, 0.0f}), {0}), 1);
  }
}

TEST(Sampler, TopKOneEqualsGreedy) {
  torch::manual_seed(11);
  SamplingOptions options = Sampling(1.5f, 7);
  options.top_k = 1;
  Sampler sampler(options);
  Sampler greedy(SamplingOptions{});
  for (int i = 0; i < 50; ++i) {
    const at::Tensor logits = torch::randn({100});
    EXPECT_EQ(sampler.Sample(logits, {}), greedy.Sample(logits, {}));
  }
}

TEST(Sampler, SameSeedSameSequence) {
  const at::Tensor logits = torch::zeros({50});
  Sampler first(Sampling(1.0f, 42));
  Sampler second(Sampling(1.0f, 42));
  EXPECT_EQ(DrawMany(first, logits, 100), DrawMany(second, logits, 100));
}

TEST(Sampler, DifferentSeedDifferentSequence) {
  const at::Tensor logits = torch::zeros({50});
  Sampler first(Sampling(1.0f, 42));
  Sampler second(Sampling(1.0f, 43));
  EXPECT_NE(DrawMany(first, logits, 100), DrawMany(second, logits, 100));
}

TEST(Sampler, SmallTopPKeepsTopToken) {
  SamplingOptions options = Sampling(1.0f, 5);
  options.top_p = 0.01f;
  Sampler sampler(options);
  const at::Tensor logits = Logits({1.0f, 3.0f, 2.0f, 2.9f});
  for (const int id : DrawMany(sampler, logits, 200)) EXPECT_EQ(id, 1);
}

TEST(Sampler, TopPKeepsNucleus) {
  // Probabilities 0.5, 0.3, 0.2: the smallest set reaching 0.7 is {0, 1}.
  SamplingOptions options = Sampling(1.0f, 9);
  options.top_p = 0.7f;
  Sampler sampler(options);
  const std::vector<double> frequencies = Frequencies(
      DrawMany(sampler, LogitsFromProbabilities({0.5f, 0.3f, 0.2f}), 2000), 3);
  EXPECT_NEAR(frequencies[0], 0.625, 0.04);
  EXPECT_NEAR(frequencies[1], 0.375, 0.04);
  EXPECT_EQ(frequencies[2], 0.0);
}

TEST(Sampler, TopKRenormalizes) {
  SamplingOptions options = Sampling(1.0f, 13);
  options.top_k = 2;
  Sampler sampler(options);
  const std::vector<double> frequencies = Frequencies(
      DrawMany(sampler, LogitsFromProbabilities({0.1f, 0.5f, 0.15f, 0.25f}),
               2000),
      4);
  EXPECT_EQ(frequencies[0], 0.0);
  EXPECT_NEAR(frequencies[1], 2.0 / 3.0, 0.04);
  EXPECT_EQ(frequencies[2], 0.0);
  EXPECT_NEAR(frequencies[3], 1.0 / 3.0, 0.04);
}

TEST(Sampler, FrequenciesMatchSoftmax) {
  // With 2000 draws the standard error of each frequency is at most 0.011,
  // so 0.04 is over three and a half standard errors.
  const std::vector<float> probabilities = {0.5f, 0.25f, 0.15f, 0.1f};
  Sampler sampler(Sampling(1.0f, 2024));
  const std::vector<double> frequencies = Frequencies(
      DrawMany(sampler, LogitsFromProbabilities(probabilities), 2000), 4);
  for (size_t i = 0; i < probabilities.size(); ++i) {
    EXPECT_NEAR(frequencies[i], probabilities[i], 0.04) << "id " << i;
  }
}

TEST(Sampler, TemperatureFlattens) {
  // Temperature 2 turns probabilities proportional to p into ones
  // proportional to sqrt(p): 0.64 and 0.36 become 0.5714 and 0.4286.
  Sampler sampler(Sampling(2.0f, 77));
  const std::vector<double> frequencies = Frequencies(
      DrawMany(sampler, LogitsFromProbabilities({0.64f, 0.36f}), 2000), 2);
  EXPECT_NEAR(frequencies[0], 0.8 / 1.4, 0.04);
  EXPECT_NEAR(frequencies[1], 0.6 / 1.4, 0.04);
}

TEST(Sampler, SamplingSkipsNanAndNegativeInfinity) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Sampler sampler(Sampling(1.0f, 1));
  for (const int id :
       DrawMany(sampler, Logits({nan, 0.0f, -inf, 0.0f, nan}), 200)) {
    EXPECT_TRUE(id == 1 || id == 3) << id;
  }
}

TEST(Sampler, PositiveInfinityTakesAll) {
  const float inf = std::numeric_limits<float>::infinity();
  Sampler sampler(Sampling(1.0f, 1));
  for (const int id : DrawMany(sampler, Logits({0.0f, inf, 5.0f}), 50)) {
    EXPECT_EQ(id, 1);
  }
}

TEST(Sampler, AcceptsOtherShapesAndDtypes) {
  Sampler sampler(SamplingOptions{});
  const at::Tensor logits = Logits({0.5f, 0.25f, 2.0f});
  EXPECT_EQ(sampler.Sample(logits.reshape({1, 3}), {}), 2);
  EXPECT_EQ(sampler.Sample(logits.reshape({1, 1, 3}), {}), 2);
  EXPECT_EQ(sampler.Sample(logits.to(torch::kFloat64), {}), 2);
  EXPECT_EQ(sampler.Sample(logits.to(torch::kBFloat16), {}), 2);
  EXPECT_EQ(sampler.Sample(torch::arange(10, torch::kFloat32).slice(0, 0, 10, 3),
                           {}),
            3);
}

TEST(Sampler, RejectsBadLogits) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Sampler sampler(Sampling(1.0f, 1));
  EXPECT_EQ(sampler.Sample(at::Tensor(), {}), -1);
  EXPECT_EQ(sampler.Sample(torch::zeros({0}), {}), -1);
  EXPECT_EQ(sampler.Sample(torch::zeros({2, 3}), {}), -1);
  EXPECT_EQ(sampler.Sample(torch::scalar_tensor(1.0f), {}), -1);
  EXPECT_EQ(sampler.Sample(torch::tensor({1, 2, 3}, torch::kInt64), {}), -1);
  EXPECT_EQ(sampler.Sample(Logits({nan, nan}), {}), -1);
  EXPECT_EQ(sampler.Sample(Logits({-inf, -inf}), {}), -1);
}

TEST(Sampler, InvalidOptionsFallBack) {
  // The constructor replaces a negative temperature by 0, which is greedy.
  SamplingOptions options = Sampling(-1.0f, 1);
  options.top_k = -3;
  options.top_p = 2.0f;
  options.repetition_penalty = 0.0f;
  Sampler sampler(options);
  EXPECT_EQ(sampler.options().temperature, 0.0f);
  EXPECT_EQ(sampler.options().top_k, 0);
  EXPECT_EQ(sampler.options().top_p, 1.0f);
  EXPECT_EQ(sampler.options().repetition_penalty, 1.0f);
  EXPECT_EQ(sampler.Sample(Logits({0.0f, 1.0f, 0.5f}), {1}), 1);
}

TEST(ValidateSamplingOptions, AcceptsValid) {
  EXPECT_TRUE(ValidateSamplingOptions(SamplingOptions{}).ok());

  SamplingOptions options = Sampling(0.7f, 123);
  options.top_k = 40;
  options.top_p = 0.9f;
  options.repetition_penalty = 1.1f;
  EXPECT_TRUE(ValidateSamplingOptions(options).ok());

  options.top_p = 1.0f;
  options.repetition_penalty = 0.5f;
  EXPECT_TRUE(ValidateSamplingOptions(options).ok());
}

TEST(ValidateSamplingOptions, RejectsNegativeTemperature) {
  SamplingOptions options = Sampling(-0.5f, 0);
  const absl::Status status = ValidateSamplingOptions(options);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("temperature -0.5"), absl::string_view::npos)
      << status;

  options.temperature = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(ValidateSamplingOptions(options).code(),
            absl::StatusCode::kInvalidArgument);
  options.temperature = std::numeric_limits<float>::infinity();
  EXPECT_EQ(ValidateSamplingOptions(options).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ValidateSamplingOptions, RejectsTopPOutsideRange) {
  for (const float top_p : {0.0f, -0.1f, 1.01f, 2.0f,
                            std::numeric_limits<float>::quiet_NaN()}) {
    SamplingOptions options;
    options.top_p = top_p;
    const absl::Status status = ValidateSamplingOptions(options);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << top_p;
    EXPECT_NE(status.message().find("top_p"), absl::string_view::npos)
        << status;
  }
}

TEST(ValidateSamplingOptions, RejectsNegativeTopK) {
  SamplingOptions options;
  options.top_k = -1;
  const absl::Status status = ValidateSamplingOptions(options);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("top_k -1"), absl::string_view::npos)
      << status;
}

TEST(ValidateSamplingOptions, RejectsNonPositivePenalty) {
  for (const float penalty : {0.0f, -1.0f,
                              std::numeric_limits<float>::infinity()}) {
    SamplingOptions options;
    options.repetition_penalty = penalty;
    const absl::Status status = ValidateSamplingOptions(options);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << penalty;
    EXPECT_NE(status.message().find("repetition_penalty"),
              absl::string_view::npos)
        << status;
  }
}

}  // namespace
}  // namespace pollen::client
