#include "node/block_span.h"

#include <filesystem>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/checkpoint.h"
#include "tests/support/checkpoint_fixtures.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

namespace fs = std::filesystem;
using ::pollen::testing::Stories260kDir;
using ::pollen::testing::TempDir;

std::shared_ptr<const Checkpoint> OpenStories() {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  return checkpoint.ok() ? *checkpoint : nullptr;
}

// Runs blocks [from, to) of `span` on `hidden` from position 0.
at::Tensor RunFresh(const BlockSpan& span, const at::Tensor& hidden, int from,
                    int to) {
  std::vector<LayerKvCache> cache =
      span.AllocateCache(from, to, hidden.size(0), hidden.size(1));
  auto output = span.Forward(hidden, cache, 0, from, to);
  EXPECT_TRUE(output.ok()) << output.status();
  return output.ok() ? *output : at::Tensor();
}

TEST(BlockSpan, LoadsStories) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  auto span = BlockSpan::Load(*checkpoint, 0, 5, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();
  EXPECT_EQ((*span)->start(), 0);
  EXPECT_EQ((*span)->end(), 5);
  EXPECT_EQ((*span)->config().hidden_size, 64);
  EXPECT_EQ((*span)->dtype(), at::kFloat);
  EXPECT_TRUE((*span)->device().is_cpu());
  EXPECT_EQ((*span)->ParameterBytes(),
            5 * 4 * (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64));
  // 2 (keys, values) x 4 kv heads x head_dim 8 x 4 bytes.
  EXPECT_EQ((*span)->CacheBytesPerTokenPerBlock(), 256);
}

TEST(BlockSpan, AllocateCache) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  auto span = BlockSpan::Load(*checkpoint, 1, 4, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();

  const std::vector<LayerKvCache> cache = (*span)->AllocateCache(2, 4, 3, 20);
  ASSERT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache[1].keys.sizes(), (at::IntArrayRef{3, 4, 20, 8}));
  EXPECT_EQ(cache[1].values.sizes(), (at::IntArrayRef{3, 4, 20, 8}));
  EXPECT_EQ(cache[0].keys.count_nonzero().item<int64_t>(), 0);

  EXPECT_TRUE((*span)->AllocateCache(0, 2, 1, 8).empty());
  EXPECT_TRUE((*span)->AllocateCache(2, 5, 1, 8).empty());
  EXPECT_TRUE((*span)->AllocateCache(2, 2, 1, 8).empty());
  EXPECT_TRUE((*span)->AllocateCache(1, 2, 0, 8).empty());
}

TEST(BlockSpan, RejectsOutOfRange) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  const std::vector<std::pair<int, int>> ranges = {
      {-1, 2}, {0, 6}, {3, 3}, {4, 2}, {5, 6}};
  for (const auto& [start, end] : ranges) {
    const absl::Status status =
        BlockSpan::Load(*checkpoint, start, end, at::kFloat, at::kCPU)
            .status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument)
        << start << ":" << end;
    const std::string range = "[" + std::to_string(start) + ", " +
                              std::to_string(end) + ")";
    EXPECT_NE(status.message().find(range), absl::string_view::npos)
        << status;
    EXPECT_NE(status.message().find("has 5 blocks"), absl::string_view::npos)
        << status;
  }
}

TEST(BlockSpan, RejectsUnsupportedDtype) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  EXPECT_EQ(BlockSpan::Load(*checkpoint, 0, 1, at::kDouble, at::kCPU)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      BlockSpan::Load(*checkpoint, 0, 1, at::kHalf, at::kCPU).status().code(),
      absl::StatusCode::kInvalidArgument);
}

TEST(BlockSpan, LoadsWithoutOtherShards) {
  TempDir dir;
  auto shards = pollen::testing::MakeShardedCopy(Stories260kDir(), dir.path());
  ASSERT_TRUE(shards.ok()) << shards.status();
  ASSERT_EQ(shards->size(), 6u);
  for (int shard : {0, 1, 2, 5}) {
    ASSERT_TRUE(fs::remove(dir.path() + "/" + (*shards)[shard]));
  }

  auto sharded = Checkpoint::Open(dir.path());
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  auto span = BlockSpan::Load(**sharded, 3, 5, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();
  const absl::Status missing =
      BlockSpan::Load(**sharded, 2, 5, at::kFloat, at::kCPU).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);

  // The sharded span computes what the single-file span does.
  const auto single = OpenStories();
  ASSERT_NE(single, nullptr);
  auto reference = BlockSpan::Load(*single, 3, 5, at::kFloat, at::kCPU);
  ASSERT_TRUE(reference.ok()) << reference.status();
  at::manual_seed(1);
  const at::Tensor hidden = at::randn({2, 6, 64});
  EXPECT_TRUE(at::equal(RunFresh(**span, hidden, 3, 5),
                        RunFresh(**reference, hidden, 3, 5)));
}

TEST(BlockSpan, SubRangesCompose) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  auto span = BlockSpan::Load(*checkpoint, 0, 5, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();
  at::manual_seed(2);
  const at::Tensor hidden = at::randn({1, 7, 64});

  const at::Tensor whole = RunFresh(**span, hidden, 0, 5);
  const at::Tensor split =
      RunFresh(**span, RunFresh(**span, hidden, 0, 2), 2, 5);
  EXPECT_TRUE(at::allclose(split, whole, 1e-6, 1e-6));
}

TEST(BlockSpan, Bfloat16Runs) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  auto f32 = BlockSpan::Load(*checkpoint, 0, 5, at::kFloat, at::kCPU);
  auto bf16 = BlockSpan::Load(*checkpoint, 0, 5, at::kBFloat16, at::kCPU);
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ((*bf16)->CacheBytesPerTokenPerBlock(), 128);
  EXPECT_EQ((*bf16)->ParameterBytes() * 2, (*f32)->ParameterBytes());

  at::manual_seed(3);
  const at::Tensor hidden = at::randn({2, 5, 64});
  const at::Tensor expected = RunFresh(**f32, hidden, 0, 5);
  std::vector<LayerKvCache> cache = (*bf16)->AllocateCache(0, 5, 2, 8);
  EXPECT_EQ(cache[0].keys.scalar_type(), at::kBFloat16);

  // Prefill, then one decode step.
  auto prefill = (*bf16)->Forward(hidden.narrow(1, 0, 4), cache, 0, 0, 5);
  ASSERT_TRUE(prefill.ok()) << prefill.status();
  auto decode = (*bf16)->Forward(hidden.narrow(1, 4, 1), cache, 4, 0, 5);
  ASSERT_TRUE(decode.ok()) << decode.status();
  const at::Tensor output = at::cat({*prefill, *decode}, 1);
  EXPECT_EQ(output.scalar_type(), at::kFloat);
  EXPECT_TRUE(output.isfinite().all().item<bool>());

  // bfloat16 has an 8-bit significand (2 to 3 decimal digits), so compare
  // relative to the scale of the hidden states.
  const double scale = expected.abs().max().item<double>();
  const double error = (output - expected).abs().max().item<double>();
  EXPECT_LT(error, 0.05 * scale) << "scale " << scale;
}

TEST(BlockSpan, ForwardRejectsBadArguments) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  auto span = BlockSpan::Load(*checkpoint, 1, 3, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();
  const at::Tensor hidden = at::randn({1, 4, 64});
  std::vector<LayerKvCache> cache = (*span)->AllocateCache(1, 3, 1, 6);

  struct Case {
    const char* name;
    absl::Status status;
    const char* expected;  // part of the message
  };
  std::vector<LayerKvCache> short_cache = (*span)->AllocateCache(1, 2, 1, 6);
  const std::vector<Case> cases = {
      {"range outside span", (*span)->Forward(hidden, cache, 0, 0, 2).status(),
       "span [1, 3)"},
      {"cache count", (*span)->Forward(hidden, short_cache, 0, 1, 3).status(),
       "got 1 KV caches"},
      {"hidden size",
       (*span)->Forward(at::randn({1, 4, 32}), cache, 0, 1, 3).status(),
       "[1, 4, 32]"},
      {"no tokens",
       (*span)->Forward(at::randn({1, 0, 64}), cache, 0, 1, 3).status(),
       "new_tokens >= 1"},
      {"integer hidden",
       (*span)->Forward(at::ones({1, 4, 64}, at::kLong), cache, 0, 1, 3)
           .status(),
       "floating-point"},
      {"past cache", (*span)->Forward(hidden, cache, 3, 1, 3).status(),
       "positions [3, 7) exceed the KV cache of block 1"},
      {"negative position", (*span)->Forward(hidden, cache, -1, 1, 3).status(),
       "positions [-1, 3)"},
      {"batch mismatch",
       (*span)->Forward(at::randn({2, 4, 64}), cache, 0, 1, 3).status(),
       "KV cache of block 1"},
  };
  for (const Case& test_case : cases) {
    EXPECT_EQ(test_case.status.code(), absl::StatusCode::kInvalidArgument)
        << test_case.name << ": " << test_case.status;
    EXPECT_NE(test_case.status.message().find(test_case.expected),
              absl::string_view::npos)
        << test_case.name << ": " << test_case.status;
  }
}

TEST(BlockSpan, ForwardKeepsInputDtype) {
  const auto checkpoint = OpenStories();
  ASSERT_NE(checkpoint, nullptr);
  auto span = BlockSpan::Load(*checkpoint, 0, 1, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();
  std::vector<LayerKvCache> cache = (*span)->AllocateCache(0, 1, 1, 4);
  auto output = (*span)->Forward(at::randn({1, 2, 64}).to(at::kBFloat16),
                                 cache, 0, 0, 1);
  ASSERT_TRUE(output.ok()) << output.status();
  EXPECT_EQ(output->scalar_type(), at::kBFloat16);
  EXPECT_FALSE(output->requires_grad());
}

}  // namespace
}  // namespace pollen::node
