#include "client/bench/memory_bandwidth.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <thread>
#include <vector>

namespace pollen::bench {
namespace {

TEST(MemoryBandwidth, SumWordsAddsEveryWord) {
  std::vector<uint64_t> words(1003);
  std::iota(words.begin(), words.end(), 1);
  EXPECT_EQ(SumWords(words.data(), words.size()), 1003u * 1004 / 2);
  EXPECT_EQ(SumWords(words.data(), 3), 6u);
  EXPECT_EQ(SumWords(words.data(), 0), 0u);
  // 64 words fill every stream with whole groups of 4, and 67 leave a rest.
  EXPECT_EQ(SumWords(words.data(), 64), 64u * 65 / 2);
  EXPECT_EQ(SumWords(words.data(), 67), 67u * 68 / 2);
}

TEST(MemoryBandwidth, MeasuresPositiveBandwidth) {
  MemoryBandwidthOptions options;
  options.buffer_bytes = 64 << 20;
  options.threads = 2;
  options.passes = 2;
  auto bandwidth = MeasureMemoryBandwidth(options);
  ASSERT_TRUE(bandwidth.ok()) << bandwidth.status();
  // Any machine that runs the tests reads faster than 100 MB/s.
  EXPECT_GT(bandwidth->bytes_per_s, 1e8);
  EXPECT_EQ(bandwidth->threads, 2);
  EXPECT_EQ(bandwidth->buffer_bytes, 64 << 20);
  EXPECT_EQ(bandwidth->Describe(),
            "2 threads summing a 64 MiB buffer of 64-bit words in 8 streams "
            "each, best of 2 passes");
}

TEST(MemoryBandwidth, DefaultsToOneThreadPerHardwareThread) {
  MemoryBandwidthOptions options;
  options.buffer_bytes = 8 << 20;
  options.passes = 1;
  auto bandwidth = MeasureMemoryBandwidth(options);
  ASSERT_TRUE(bandwidth.ok()) << bandwidth.status();
  EXPECT_EQ(bandwidth->threads,
            static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

TEST(MemoryBandwidth, RejectsTinyBufferAndNoPasses) {
  MemoryBandwidthOptions options;
  options.buffer_bytes = 1000;
  EXPECT_EQ(MeasureMemoryBandwidth(options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.buffer_bytes = 8 << 20;
  options.passes = 0;
  EXPECT_EQ(MeasureMemoryBandwidth(options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pollen::bench
