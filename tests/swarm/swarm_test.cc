// End to end through real node processes: the client library generates the
// reference stories260k ids through every way of splitting the model.
#include <gtest/gtest.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "client/swarm_client.h"
#include "pollen/client.h"
#include "tests/support/checkpoint_fixtures.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

class SwarmTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { swarm_ = new LocalSwarm(); }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
  }

  // Starts one node per span under a model id of its own, so that each
  // split is routed on its own.
  static void ServeSplit(const std::string& model_id,
                         const std::vector<std::pair<int, int>>& spans,
                         const std::string& model_dir = Stories260kDir()) {
    for (const auto& [start, end] : spans) {
      auto index = swarm_->StartNode(model_dir, model_id, start, end);
      ASSERT_TRUE(index.ok()) << index.status();
    }
  }

  static std::unique_ptr<Client> Connect(const std::string& model_id,
                                         bool push = false) {
    ClientOptions options;
    options.push = push;
    options.model_dir = Stories260kDir();
    options.model_id = model_id;
    options.initial_peers = {swarm_->peer()};
    options.discovery_wait = absl::Seconds(20);
    auto client = Client::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  static GenerationOptions Greedy(int max_new_tokens) {
    GenerationOptions options;
    options.max_new_tokens = max_new_tokens;
    return options;
  }

  static LocalSwarm* swarm_;
};

LocalSwarm* SwarmTest::swarm_ = nullptr;

TEST_F(SwarmTest, GreedyMatchesReferenceForEverySplit) {
  const std::vector<std::pair<std::string, std::vector<std::pair<int, int>>>>
      splits = {
          {"split-1", {{0, 5}}},
          {"split-2a", {{0, 1}, {1, 5}}},
          {"split-2b", {{0, 2}, {2, 5}}},
          {"split-2c", {{0, 3}, {3, 5}}},
          {"split-2d", {{0, 4}, {4, 5}}},
          {"split-3", {{0, 2}, {2, 4}, {4, 5}}},
          {"split-5", {{0, 1}, {1, 2}, {2, 3}, {3, 4}, {4, 5}}},
      };
  for (const auto& [model_id, spans] : splits) {
    ServeSplit(model_id, spans);
  }

  for (const auto& [model_id, spans] : splits) {
    for (const bool push : {false, true}) {
      SCOPED_TRACE(absl::StrCat(model_id, push ? " with push" : " relayed"));
      std::unique_ptr<Client> client = Connect(model_id, push);
      ASSERT_NE(client, nullptr);
      auto result = client->GenerateFromIds(kStoriesPromptIds, Greedy(48));
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_EQ(result->new_ids, kStoriesReferenceIds);
      EXPECT_EQ(result->route.size(), spans.size());
    }
  }
}

TEST_F(SwarmTest, TextPromptStreamsReferenceStory) {
  ServeSplit("text", {{0, 3}, {3, 5}});
  std::unique_ptr<Client> client = Connect("text");
  ASSERT_NE(client, nullptr);

  std::string streamed;
  auto result = client->Generate(
      kStoriesPrompt, Greedy(48),
      [&streamed](const std::string& piece) { streamed += piece; });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->prompt_ids, kStoriesPromptIds);
  EXPECT_EQ(result->new_ids, kStoriesReferenceIds);
  EXPECT_EQ(streamed, result->text);
  EXPECT_EQ(result->text.rfind(", there was a little girl named Lily.", 0), 0u)
      << result->text;
}

TEST_F(SwarmTest, ShardedCopyGivesSameIds) {
  TempDir dir;
  auto shards = MakeShardedCopy(Stories260kDir(), dir.path());
  ASSERT_TRUE(shards.ok()) << shards.status();
  ServeSplit("sharded", {{0, 2}, {2, 5}}, dir.path());

  std::unique_ptr<Client> client = Connect("sharded");
  ASSERT_NE(client, nullptr);
  auto result = client->GenerateFromIds(kStoriesPromptIds, Greedy(48));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->new_ids, kStoriesReferenceIds);
}

TEST_F(SwarmTest, NodeStartsWithoutShardsOutsideItsSpan) {
  TempDir dir;
  auto shards = MakeShardedCopy(Stories260kDir(), dir.path());
  ASSERT_TRUE(shards.ok()) << shards.status();
  // Keep only the shards of blocks 3 and 4; the embeddings shard and the
  // shards of blocks 0-2 are gone.
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    const std::string name = entry.path().filename().string();
    if (name.find(".safetensors") == std::string::npos ||
        name.find(".json") != std::string::npos) {
      continue;
    }
    if (name != (*shards)[3] && name != (*shards)[4]) {
      std::filesystem::remove(entry.path());
    }
  }
  ServeSplit("partial", {{3, 5}}, dir.path());
  ServeSplit("partial", {{0, 3}});

  std::unique_ptr<Client> client = Connect("partial");
  ASSERT_NE(client, nullptr);
  auto result = client->GenerateFromIds(kStoriesPromptIds, Greedy(48));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->new_ids, kStoriesReferenceIds);
}

TEST_F(SwarmTest, ChatKeepsConversationOnNodes) {
  ServeSplit("chat", {{0, 2}, {2, 5}});
  std::unique_ptr<Client> client = Connect("chat");
  ASSERT_NE(client, nullptr);

  auto chat = client->StartChat(256);
  ASSERT_TRUE(chat.ok()) << chat.status();
  auto first = (*chat)->Send(kStoriesPrompt, Greedy(16));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->new_ids,
            std::vector<int>(kStoriesReferenceIds.begin(),
                             kStoriesReferenceIds.begin() + 16));

  auto second = (*chat)->Send("The dog", Greedy(16));
  ASSERT_TRUE(second.ok()) << second.status();

  // The same conversation sent as one prompt gives the same reply.
  std::vector<int> whole = first->prompt_ids;
  whole.insert(whole.end(), first->new_ids.begin(), first->new_ids.end());
  whole.insert(whole.end(), second->prompt_ids.begin(), second->prompt_ids.end());
  auto replay = client->GenerateFromIds(whole, Greedy(16));
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_EQ(second->new_ids, replay->new_ids);
}

TEST_F(SwarmTest, SeededSamplingRepeats) {
  ServeSplit("sampling", {{0, 5}});
  std::unique_ptr<Client> client = Connect("sampling");
  ASSERT_NE(client, nullptr);

  GenerationOptions options = Greedy(24);
  options.sampling.temperature = 0.9f;
  options.sampling.top_k = 40;
  options.sampling.top_p = 0.95f;
  options.sampling.seed = 7;
  auto first = client->GenerateFromIds(kStoriesPromptIds, options);
  auto second = client->GenerateFromIds(kStoriesPromptIds, options);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(first->new_ids, second->new_ids);
}

TEST_F(SwarmTest, MissingBlockIsNamedAfterWait) {
  ServeSplit("gap", {{0, 2}, {3, 5}});
  ClientOptions options;
  options.model_dir = Stories260kDir();
  options.model_id = "gap";
  options.initial_peers = {swarm_->peer()};
  options.discovery_wait = absl::Seconds(2);
  auto client = Client::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();

  auto result = (*client)->GenerateFromIds(kStoriesPromptIds, Greedy(4));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(result.status().message().find("block 2"), std::string::npos)
      << result.status();
}

TEST_F(SwarmTest, RejectsPromptBeyondModelLength) {
  ServeSplit("length", {{0, 5}});
  std::unique_ptr<Client> client = Connect("length");
  ASSERT_NE(client, nullptr);
  auto result = client->GenerateFromIds(kStoriesPromptIds, Greedy(1000));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(result.status().message().find("512"), std::string::npos)
      << result.status();
}

// The sessions that were on a node when it died report it one after
// another: the ban counts that as one failure, and a failure after the ban
// doubles it.
TEST(SwarmClientBans, ReportsDuringBanCountOnce) {
  LocalSwarm swarm;
  auto client = client::SwarmClient::Connect({swarm.peer()});
  ASSERT_TRUE(client.ok()) << client.status();
  for (int i = 0; i < 5; ++i) (*client)->ReportFailure("node-a");
  absl::Time now = absl::Now();
  EXPECT_EQ((*client)->BannedNodes(now).count("node-a"), 1u);
  EXPECT_EQ((*client)->BannedNodes(now + absl::Milliseconds(1500)).count("node-a"),
            0u);

  absl::SleepFor(absl::Milliseconds(1100));
  (*client)->ReportFailure("node-a");
  now = absl::Now();
  EXPECT_EQ((*client)->BannedNodes(now + absl::Milliseconds(1500)).count("node-a"),
            1u);
  EXPECT_EQ((*client)->BannedNodes(now + absl::Milliseconds(2500)).count("node-a"),
            0u);
}

}  // namespace
}  // namespace pollen::testing
