#include "node/span_choice.h"
#include "common/node_records.h"

#include <gtest/gtest.h>

#include "common/checkpoint.h"
#include "node/block_span.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

using ::pollen::testing::Stories260kDir;

v1::NodeRecord Record(const std::string& node_id, int start, int end,
                      v1::NodeState state, int64_t announced_ms,
                      const std::string& model_id = "m") {
  v1::NodeRecord record;
  record.set_model_id(model_id);
  record.set_node_id(node_id);
  record.mutable_blocks()->set_start(start);
  record.mutable_blocks()->set_end(end);
  record.set_state(state);
  record.set_announced_ms(announced_ms);
  record.set_throughput(10);
  record.set_prefill_throughput(100);
  (*record.mutable_next_rtt_ms())["next"] = 1.5;
  return record;
}

TEST(SpansFromRecords, KeepsNewestOnlineRecordPerNode) {
  const std::vector<v1::NodeRecord> records = {
      Record("a", 0, 2, v1::NODE_STATE_ONLINE, 100),
      Record("a", 2, 4, v1::NODE_STATE_ONLINE, 200),
      Record("b", 0, 5, v1::NODE_STATE_ONLINE, 300),
      Record("b", 0, 5, v1::NODE_STATE_OFFLINE, 400),
      Record("c", 1, 3, v1::NODE_STATE_ONLINE, 100, "other-model"),
  };
  const std::vector<scheduler::ServerSpan> spans =
      SpansFromRecords(records, "m");
  ASSERT_EQ(spans.size(), 1u);
  EXPECT_EQ(spans[0].node_id, "a");
  EXPECT_EQ(spans[0].start, 2);
  EXPECT_EQ(spans[0].end, 4);
  EXPECT_EQ(spans[0].throughput, 10);
  EXPECT_EQ(spans[0].prefill_throughput, 100);
  EXPECT_EQ(spans[0].next_rtt_ms.at("next"), 1.5);
}

TEST(BlockWeightBytes, MatchesLoadedBlock) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (Quantization quantization :
         {Quantization::kNone, Quantization::kInt8}) {
      auto span = BlockSpan::Load(**checkpoint, 1, 2, dtype, at::kCPU,
                                  quantization);
      ASSERT_TRUE(span.ok()) << span.status();
      EXPECT_EQ(BlockWeightBytes((*checkpoint)->config(), dtype, quantization),
                (*span)->ParameterBytes())
          << c10::toString(dtype) << " " << QuantizationName(quantization);
    }
  }
}

TEST(ParseMemAvailable, ReadsKibibytes) {
  auto bytes = ParseMemAvailable(
      "MemTotal:       16000000 kB\nMemFree:  100 kB\n"
      "MemAvailable:    8000000 kB\nBuffers: 5 kB\n");
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, int64_t{8000000} * 1024);
}

TEST(ParseMemAvailable, RejectsMissingOrMalformedLine) {
  EXPECT_EQ(ParseMemAvailable("MemTotal: 5 kB\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: lots\n").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AvailableMemoryBytes, CpuIsPositive) {
  auto bytes = AvailableMemoryBytes(at::kCPU);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_GT(*bytes, 0);
}

TEST(ChooseSpanLength, RequestedIsCappedAtModel) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  std::string reason;

  auto two = ChooseSpanLength(2, config, at::kFloat, Quantization::kNone,
                              at::kCPU, 1000, &reason);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(*two, 2);

  auto capped = ChooseSpanLength(9, config, at::kFloat, Quantization::kNone,
                                 at::kCPU, 1000, &reason);
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_EQ(*capped, 5);
  EXPECT_NE(reason.find("capped"), std::string::npos) << reason;
}

TEST(ChooseSpanLength, StoriesFitsWhollyInMemory) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  std::string reason;
  auto length = ChooseSpanLength(0, (*checkpoint)->config(), at::kFloat,
                                 Quantization::kInt8, at::kCPU, 16384, &reason);
  ASSERT_TRUE(length.ok()) << length.status();
  EXPECT_EQ(*length, 5);
  EXPECT_NE(reason.find("fit in"), std::string::npos) << reason;
}

TEST(ChooseSpanLength, HugeCacheBudgetIsResourceExhausted) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  std::string reason;
  // 2^50 tokens of 256 bytes each per block cannot fit anywhere.
  auto length = ChooseSpanLength(0, (*checkpoint)->config(), at::kFloat,
                                 Quantization::kNone, at::kCPU,
                                 int64_t{1} << 50, &reason);
  EXPECT_EQ(length.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(length.status().message().find("--cache-tokens"),
            absl::string_view::npos)
      << length.status();
}

}  // namespace
}  // namespace pollen::node
