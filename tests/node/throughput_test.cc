#include "node/throughput.h"

#include <chrono>
#include <fstream>

#include <gtest/gtest.h>

#include "common/checkpoint.h"
#include "node/block_span.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

using ::pollen::testing::Stories260kDir;
using ::pollen::testing::TempDir;

TEST(MeasureThroughput, StoriesIsPositiveAndQuick) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto span = BlockSpan::Load(**checkpoint, 2, 4, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();

  const auto started = std::chrono::steady_clock::now();
  auto throughput = MeasureThroughput(**span);
  const auto elapsed = std::chrono::steady_clock::now() - started;
  ASSERT_TRUE(throughput.ok()) << throughput.status();
  EXPECT_GT(throughput->decode_steps_per_s, 0);
  EXPECT_GT(throughput->prefill_tokens_per_s, 0);
  EXPECT_LT(elapsed, std::chrono::seconds(2));
}

TEST(ThroughputCacheKey, NamesShapeDeviceAndDtype) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  constexpr Quantization kNone = Quantization::kNone;

  const std::string key =
      ThroughputCacheKey("stories", config, at::kCPU, at::kFloat, kNone, 2);
  EXPECT_EQ(key,
            "stories hidden=64 intermediate=172 heads=8 kv_heads=4 "
            "head_dim=8 device=cpu dtype=float32 threads=2");
  EXPECT_NE(key, ThroughputCacheKey("stories", config, at::kCPU,
                                    at::kBFloat16, kNone, 2));
  EXPECT_NE(key, ThroughputCacheKey("stories", config, at::Device("cuda:0"),
                                    at::kFloat, kNone, 2));
  EXPECT_NE(key,
            ThroughputCacheKey("other", config, at::kCPU, at::kFloat, kNone, 2));
}

TEST(ThroughputCacheKey, NamesInt8Quantization) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(ThroughputCacheKey("stories", (*checkpoint)->config(), at::kCPU,
                               at::kFloat, Quantization::kInt8, 2),
            "stories hidden=64 intermediate=172 heads=8 kv_heads=4 "
            "head_dim=8 device=cpu dtype=float32 quantization=int8 threads=2");
}

TEST(ThroughputCache, RoundTrip) {
  TempDir dir;
  const std::string path = dir.path() + "/nested/throughput.json";
  Throughput first{120.5, 900.25};
  Throughput second{7, 8};
  ASSERT_TRUE(WriteCachedThroughput(path, "a", first).ok());
  ASSERT_TRUE(WriteCachedThroughput(path, "b", second).ok());

  auto read_first = ReadCachedThroughput(path, "a");
  ASSERT_TRUE(read_first.ok()) << read_first.status();
  EXPECT_EQ(read_first->decode_steps_per_s, 120.5);
  EXPECT_EQ(read_first->prefill_tokens_per_s, 900.25);
  auto read_second = ReadCachedThroughput(path, "b");
  ASSERT_TRUE(read_second.ok()) << read_second.status();
  EXPECT_EQ(read_second->decode_steps_per_s, 7);
}

TEST(ThroughputCache, MissingFileOrEntryIsNotFound) {
  TempDir dir;
  const std::string path = dir.path() + "/throughput.json";
  EXPECT_EQ(ReadCachedThroughput(path, "a").status().code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE(WriteCachedThroughput(path, "a", Throughput{1, 2}).ok());
  const absl::Status missing = ReadCachedThroughput(path, "b").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("'b'"), absl::string_view::npos)
      << missing;
}

TEST(ThroughputCache, MalformedFileIsReplaced) {
  TempDir dir;
  const std::string path = dir.path() + "/throughput.json";
  std::ofstream(path) << "{not json";
  const absl::Status malformed = ReadCachedThroughput(path, "a").status();
  EXPECT_EQ(malformed.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(malformed.message().find(path), absl::string_view::npos)
      << malformed;

  ASSERT_TRUE(WriteCachedThroughput(path, "a", Throughput{3, 4}).ok());
  auto read = ReadCachedThroughput(path, "a");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->prefill_tokens_per_s, 4);
}

TEST(ThroughputCache, NonPositiveEntryIsDataLoss) {
  TempDir dir;
  const std::string path = dir.path() + "/throughput.json";
  std::ofstream(path) << R"({"version": 1, "entries": {"a": )"
                      << R"({"throughput": 0, "prefill_throughput": 5}}})";
  EXPECT_EQ(ReadCachedThroughput(path, "a").status().code(),
            absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace pollen::node
