// Nodes that measure themselves, choose their own blocks and report to
// `pollen status`, as real processes on loopback.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <opendht/value.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/cli/child_process.h"
#include "common/dht_registry.h"
#include "common/identity.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {


// The newest ONLINE record of the node named `name` among blocks [0, 5).
std::optional<v1::NodeRecord> OnlineRecord(LocalSwarm& swarm,
                                           const std::string& model_id,
                                           const std::string& name) {
  auto records = swarm.registry().FetchSpan(model_id, 0, 5, absl::Seconds(3));
  if (!records.ok()) return std::nullopt;
  std::optional<v1::NodeRecord> newest;
  for (const v1::NodeRecord& record : *records) {
    if (record.public_name() != name ||
        record.state() != v1::NODE_STATE_ONLINE) {
      continue;
    }
    if (!newest || record.announced_ms() > newest->announced_ms()) {
      newest = record;
    }
  }
  return newest;
}

// A `pollen node` that chooses its own span, which LocalSwarm::StartNode
// cannot start because it passes --blocks.
struct PlacedNode {
  std::string name;
  cli::ChildProcess process;
  v1::NodeRecord record;  // its first ONLINE record
};

absl::StatusOr<std::unique_ptr<PlacedNode>> StartPlacedNode(
    LocalSwarm& swarm, const std::string& model_id, const std::string& name,
    const std::vector<std::string>& extra_flags) {
  const std::string node_dir = absl::StrCat(swarm.work_dir(), "/", name);
  std::filesystem::create_directories(node_dir);
  std::vector<std::string> argv = {
      PollenBinary(), "node", "--model", Stories260kDir(), "--model-id",
      model_id, "--port", "0", "--host", "127.0.0.1", "--initial-peers",
      swarm.peer(), "--identity", node_dir + "/identity", "--public-name",
      name, "--announce-period-s", "2", "--record-ttl-s", "10",
      "--rebalance-period-s", "0", "--throughput-cache",
      node_dir + "/throughput.json"};
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  auto process = cli::ChildProcess::Start(argv, node_dir + "/node.log");
  if (!process.ok()) return process.status();
  auto node = std::make_unique<PlacedNode>(
      PlacedNode{name, std::move(*process), v1::NodeRecord()});

  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline) {
    if (!node->process.IsRunning()) {
      return absl::UnavailableError(absl::StrCat(
          name, " exited during startup:\n", node->process.LogTail()));
    }
    if (auto record = OnlineRecord(swarm, model_id, name)) {
      node->record = *record;
      return node;
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      name, " did not announce itself within 60s:\n", node->process.LogTail()));
}

class PlacementTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { swarm_ = new LocalSwarm(); }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
  }
  static LocalSwarm* swarm_;
};

LocalSwarm* PlacementTest::swarm_ = nullptr;

TEST_F(PlacementTest, ThroughputIsMeasuredCachedAndAnnounced) {
  TempDir dir;
  const std::string cache = dir.path() + "/throughput.json";
  const std::vector<std::string> flags = {"--throughput-cache", cache};

  auto first = swarm_->StartNode(Stories260kDir(), "measured", 0, 5, flags);
  ASSERT_TRUE(first.ok()) << first.status();
  NodeHandle& measured = swarm_->node(*first);
  EXPECT_NE(ReadFile(measured.process.log_path()).find("measured throughput"),
            std::string::npos)
      << measured.process.LogTail();
  auto record = OnlineRecord(*swarm_, "measured", measured.name);
  ASSERT_TRUE(record.has_value());
  EXPECT_GT(record->throughput(), 0);
  EXPECT_GT(record->prefill_throughput(), 0);
  EXPECT_EQ(record->device(), "cpu");
  EXPECT_EQ(record->dtype(), "float32");
  ASSERT_TRUE(std::filesystem::exists(cache));
  EXPECT_EQ(measured.process.Stop(), 0);

  // The second start reads the cache and announces the same numbers.
  auto second = swarm_->StartNode(Stories260kDir(), "measured", 0, 5, flags);
  ASSERT_TRUE(second.ok()) << second.status();
  NodeHandle& cached = swarm_->node(*second);
  const std::string log = ReadFile(cached.process.log_path());
  EXPECT_NE(log.find("throughput from cache"), std::string::npos) << log;
  EXPECT_EQ(log.find("measured throughput"), std::string::npos) << log;
  auto cached_record = OnlineRecord(*swarm_, "measured", cached.name);
  ASSERT_TRUE(cached_record.has_value());
  EXPECT_EQ(cached_record->throughput(), record->throughput());
  EXPECT_EQ(cached_record->prefill_throughput(), record->prefill_throughput());
}

TEST_F(PlacementTest, NextHopRttIsAnnounced) {
  auto first = swarm_->StartNode(Stories260kDir(), "rtt", 0, 2,
                                 {"--throughput", "1"});
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = swarm_->StartNode(Stories260kDir(), "rtt", 2, 5,
                                  {"--throughput", "1"});
  ASSERT_TRUE(second.ok()) << second.status();
  auto successor = OnlineRecord(*swarm_, "rtt", swarm_->node(*second).name);
  ASSERT_TRUE(successor.has_value());

  // The first node probes and announces every 2 s.
  std::optional<v1::NodeRecord> record;
  EXPECT_TRUE(Eventually(
      [&] {
        record = OnlineRecord(*swarm_, "rtt", swarm_->node(*first).name);
        return record.has_value() &&
               record->next_rtt_ms().count(successor->node_id()) > 0;
      },
      absl::Seconds(30)))
      << (record ? record->DebugString() : "no record");
  if (record && record->next_rtt_ms().count(successor->node_id()) > 0) {
    EXPECT_GT(record->next_rtt_ms().at(successor->node_id()), 0);
  }
  // The last node has no next hop.
  EXPECT_TRUE(successor->next_rtt_ms().empty());
}

TEST_F(PlacementTest, ThreeNodesSpreadOverAllBlocks) {
  std::vector<std::unique_ptr<PlacedNode>> nodes;
  std::set<int> served;
  for (int i = 0; i < 3; ++i) {
    auto node = StartPlacedNode(
        *swarm_, "spread", absl::StrCat("spread-", i),
        {"--num-blocks", "2", "--throughput", "1", "--seed",
         absl::StrCat(i + 1)});
    ASSERT_TRUE(node.ok()) << node.status();
    const v1::BlockRange& blocks = (*node)->record.blocks();
    EXPECT_EQ(blocks.end() - blocks.start(), 2u);
    for (uint32_t block = blocks.start(); block < blocks.end(); ++block) {
      served.insert(static_cast<int>(block));
    }
    nodes.push_back(std::move(*node));
  }
  EXPECT_EQ(served, (std::set<int>{0, 1, 2, 3, 4}))
      << nodes[0]->process.LogTail() << nodes[1]->process.LogTail()
      << nodes[2]->process.LogTail();
}

TEST_F(PlacementTest, NoSpanFlagServesWhatFits) {
  auto node = StartPlacedNode(*swarm_, "fits", "fits-0", {"--throughput", "1"});
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_EQ((*node)->record.blocks().start(), 0u);
  EXPECT_EQ((*node)->record.blocks().end(), 5u);
  EXPECT_NE(ReadFile((*node)->process.log_path()).find("blocks fit in"),
            std::string::npos)
      << (*node)->process.LogTail();
}

TEST_F(PlacementTest, RebalanceMovesNodeIntoGap) {
  ASSERT_TRUE(swarm_
                  ->StartNode(Stories260kDir(), "rebalance", 0, 2,
                              {"--throughput", "1"})
                  .ok());
  ASSERT_TRUE(swarm_
                  ->StartNode(Stories260kDir(), "rebalance", 3, 5,
                              {"--throughput", "1"})
                  .ok());
  // Block 4 is served twice and block 2 not at all.
  auto mover = swarm_->StartNode(
      Stories260kDir(), "rebalance", 4, 5,
      {"--throughput", "1", "--rebalance-period-s", "2"});
  ASSERT_TRUE(mover.ok()) << mover.status();
  const std::string name = swarm_->node(*mover).name;

  std::optional<v1::NodeRecord> record;
  EXPECT_TRUE(Eventually(
      [&] {
        record = OnlineRecord(*swarm_, "rebalance", name);
        return record.has_value() && record->blocks().start() == 2 &&
               record->blocks().end() == 3;
      },
      absl::Seconds(30)))
      << (record ? record->DebugString() : "no record") << "\n"
      << swarm_->node(*mover).process.LogTail();
}

TEST_F(PlacementTest, StatusShowsBlockThroughputAndGap) {
  ASSERT_TRUE(swarm_
                  ->StartNode(Stories260kDir(), "gap", 0, 2,
                              {"--throughput", "3"})
                  .ok());
  ASSERT_TRUE(swarm_
                  ->StartNode(Stories260kDir(), "gap", 3, 5,
                              {"--throughput", "2"})
                  .ok());

  const CommandResult json = RunCommand(
      {PollenBinary(), "status", "--initial-peers", swarm_->peer(), "--json"});
  ASSERT_EQ(json.exit_code, 0) << json.stderr_text;
  const auto output = nlohmann::json::parse(json.stdout_text);
  const nlohmann::json* model = nullptr;
  for (const auto& entry : output["models"]) {
    if (entry["model_id"] == "gap") model = &entry;
  }
  ASSERT_NE(model, nullptr) << json.stdout_text;
  EXPECT_EQ((*model)["unserved_blocks"], nlohmann::json::array({2}));
  const std::vector<double> expected = {3, 3, 0, 2, 2};
  ASSERT_EQ((*model)["blocks"].size(), expected.size());
  for (size_t block = 0; block < expected.size(); ++block) {
    EXPECT_EQ((*model)["blocks"][block]["throughput"].get<double>(),
              expected[block])
        << "block " << block;
  }
  ASSERT_EQ((*model)["nodes"].size(), 2u);
  for (const auto& node : (*model)["nodes"]) {
    for (const char* key :
         {"node_id", "name", "address", "blocks", "state", "cache_tokens_left",
          "throughput", "prefill_throughput", "device", "dtype",
          "next_rtt_ms", "version", "age_s"}) {
      EXPECT_TRUE(node.contains(key)) << key;
    }
    EXPECT_EQ(node["device"], "cpu");
  }

  const CommandResult text =
      RunCommand({PollenBinary(), "status", "--initial-peers", swarm_->peer()});
  ASSERT_EQ(text.exit_code, 0) << text.stderr_text;
  const size_t model_start = text.stdout_text.find("model gap (5 blocks)");
  ASSERT_NE(model_start, std::string::npos) << text.stdout_text;
  const std::string model_text = text.stdout_text.substr(model_start);
  EXPECT_NE(model_text.find("block 2 not served"), std::string::npos)
      << model_text;
  EXPECT_NE(model_text.find("block 0: 3.0 steps/s"), std::string::npos)
      << model_text;
}

// A node's record reaches status through the model index even when its
// block keys hold nothing, as after a block lookup that missed the nodes.
TEST(StatusIndexTest, IndexRecordFillsBlocks) {
  LocalSwarm swarm;
  absl::StatusOr<dht::crypto::Identity> identity =
      CreateEphemeralIdentity("index-only");
  ASSERT_TRUE(identity.ok()) << identity.status();
  DhtOptions options;
  options.bootstrap = {swarm.peer()};
  options.identity = *identity;
  auto registry = DhtRegistry::Start(options);
  ASSERT_TRUE(registry.ok()) << registry.status();

  // The record goes under the index key only.
  v1::NodeRecord record;
  record.set_model_id("index-only");
  record.set_num_blocks(2);
  record.mutable_blocks()->set_start(0);
  record.mutable_blocks()->set_end(2);
  record.set_node_id((*registry)->node_id());
  record.set_address("127.0.0.1:1");
  record.set_state(v1::NODE_STATE_ONLINE);
  record.set_throughput(4);
  const absl::Time now = absl::Now();
  record.set_announced_ms(absl::ToUnixMillis(now));
  record.set_expires_ms(absl::ToUnixMillis(now + absl::Seconds(90)));
  const std::string payload = record.SerializeAsString();
  auto value = std::make_shared<dht::Value>(
      kNodeRecordValueType, dht::Blob(payload.begin(), payload.end()), 1);
  value->sign(*identity->first);
  ASSERT_TRUE((*registry)
                  ->PutValueForTesting(ModelIndexKey(), value, absl::Seconds(10))
                  .ok());

  const CommandResult json = RunCommand(
      {PollenBinary(), "status", "--initial-peers", swarm.peer(), "--json"});
  ASSERT_EQ(json.exit_code, 0) << json.stderr_text;
  const auto output = nlohmann::json::parse(json.stdout_text);
  ASSERT_EQ(output["models"].size(), 1u) << json.stdout_text;
  const auto& model = output["models"][0];
  EXPECT_EQ(model["model_id"], "index-only");
  EXPECT_TRUE(model["unserved_blocks"].empty()) << json.stdout_text;
  ASSERT_EQ(model["blocks"].size(), 2u);
  for (const auto& block : model["blocks"]) {
    EXPECT_EQ(block["nodes"], nlohmann::json::array({record.node_id()}))
        << block.dump();
    EXPECT_EQ(block["throughput"].get<double>(), 4) << block.dump();
  }
}

}  // namespace
}  // namespace pollen::testing
