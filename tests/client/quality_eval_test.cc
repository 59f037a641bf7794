// Teacher-forced accuracy of bfloat16 and int8 blocks on stories260k.
#include "client/quality_eval.h"

#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace pollen::client {
namespace {

using ::pollen::testing::kStoriesPromptIds;
using ::pollen::testing::kStoriesReferenceIds;
using ::pollen::testing::kStoriesReferenceText;
using ::pollen::testing::Stories260kDir;

QualityReport Compare(at::ScalarType dtype, node::Quantization quantization) {
  BlockPrecision precision;
  precision.dtype = dtype;
  precision.quantization = quantization;
  const auto report = CompareBlockPrecisionOnText(
      Stories260kDir(), kStoriesReferenceText, precision);
  EXPECT_TRUE(report.ok()) << report.status();
  return report.ok() ? *report : QualityReport();
}

TEST(CompareBlockPrecision, Float32AgreesExactly) {
  const QualityReport report = Compare(at::kFloat, node::Quantization::kNone);
  EXPECT_GT(report.tokens, 40);
  EXPECT_EQ(report.predictions, report.tokens - 1);
  EXPECT_EQ(report.top1_agreement, 1.0);
  EXPECT_EQ(report.max_abs_logit_diff, 0.0);
  EXPECT_EQ(report.perplexity_change, 0.0);
  EXPECT_EQ(report.weight_bytes, report.weight_bytes_reference);
  // The model continues its own greedy story, so the text is likely.
  EXPECT_GT(report.perplexity_reference, 1.0);
  EXPECT_LT(report.perplexity_reference, 3.0);
}

TEST(CompareBlockPrecision, Bfloat16TopOneAgreement) {
  const QualityReport report =
      Compare(at::kBFloat16, node::Quantization::kNone);
  EXPECT_GE(report.top1_agreement, 0.98);
  EXPECT_LT(std::abs(report.perplexity_change), 0.05);
  EXPECT_EQ(report.weight_bytes * 2, report.weight_bytes_reference);
}

TEST(CompareBlockPrecision, Int8TopOneAgreement) {
  const QualityReport report = Compare(at::kFloat, node::Quantization::kInt8);
  EXPECT_GE(report.top1_agreement, 0.95);
  EXPECT_LT(std::abs(report.perplexity_change), 0.10);
  EXPECT_GT(report.max_abs_logit_diff, 0.0);
  const double ratio = static_cast<double>(report.weight_bytes) /
                       static_cast<double>(report.weight_bytes_reference);
  EXPECT_GT(ratio, 0.25);
  EXPECT_LT(ratio, 0.28);
}

// More tokens than max_position_embeddings (512) run in windows; float32
// still agrees exactly, and every token but the first is predicted.
TEST(CompareBlockPrecision, LongTextRunsInWindows) {
  std::vector<int> ids = kStoriesPromptIds;
  while (ids.size() < 600) {
    ids.insert(ids.end(), kStoriesReferenceIds.begin(),
               kStoriesReferenceIds.end());
  }
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const auto report = CompareBlockPrecision(**checkpoint, ids, BlockPrecision());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->tokens, static_cast<int64_t>(ids.size()));
  EXPECT_EQ(report->predictions, report->tokens - 1);
  EXPECT_EQ(report->top1_agreement, 1.0);
}

TEST(CompareBlockPrecision, RejectsBadIds) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const auto too_short = CompareBlockPrecision(**checkpoint, {1}, BlockPrecision());
  EXPECT_EQ(too_short.status().code(), absl::StatusCode::kInvalidArgument);
  const auto outside =
      CompareBlockPrecision(**checkpoint, {1, 403, 512}, BlockPrecision());
  EXPECT_EQ(outside.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(outside.status().message().find("512"), absl::string_view::npos)
      << outside.status();
}

TEST(CompareBlockPrecision, MissingModelIsNotFound) {
  const auto report = CompareBlockPrecisionOnText(
      "/nonexistent/model", kStoriesReferenceText, BlockPrecision());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kNotFound)
      << report.status();
}

}  // namespace
}  // namespace pollen::client
