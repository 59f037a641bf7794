// Nodes die while clients use them: generation moves to other nodes and
// produces exactly the tokens of a run with no failure.
#include <signal.h>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <random>

#include "absl/strings/str_cat.h"
#include "pollen/client.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr char kModelId[] = "failover";

// Each of the two halves of stories260k is served by three nodes, so that
// any two nodes may die.
class FailoverTest : public ::testing::Test {
 protected:
  static constexpr int kReplicas = 3;

  void SetUp() override {
    for (int replica = 0; replica < kReplicas; ++replica) {
      StartNode(0, 2);
      StartNode(2, 5);
    }
  }

  void StartNode(int start, int end) {
    auto index = swarm_.StartNode(Stories260kDir(), kModelId, start, end);
    ASSERT_TRUE(index.ok()) << index.status();
    spans_[*index] = {start, end};
  }

  std::unique_ptr<Client> Connect(bool push = false) {
    ClientOptions options;
    options.push = push;
    options.model_dir = Stories260kDir();
    options.model_id = kModelId;
    options.initial_peers = {swarm_.peer()};
    options.discovery_wait = absl::Seconds(5);
    options.step_timeout = absl::Seconds(10);
    auto client = Client::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  // Sessions open on node `index`, from its Info RPC; -1 when it is down.
  int OpenSessions(int index) {
    auto stub = v1::BlockService::NewStub(grpc::CreateChannel(
        swarm_.node(index).address, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(2));
    v1::InfoResponse info;
    if (!stub->Info(&context, v1::InfoRequest(), &info).ok()) return -1;
    return static_cast<int>(info.open_sessions());
  }

  // Returns the index of a live node that serves `block` and has a session
  // open, or -1 when none has.
  int BusyNode(int block) {
    for (const auto& [index, span] : spans_) {
      if (span.first > block || block >= span.second) continue;
      if (!swarm_.node(index).process.IsRunning()) continue;
      if (OpenSessions(index) > 0) return index;
    }
    return -1;
  }

  // Kills (SIGKILL) a busy node serving `block` and returns its index, or -1.
  int KillBusyNode(int block) {
    const int index = BusyNode(block);
    if (index >= 0) {
      swarm_.node(index).process.Signal(SIGKILL);
      swarm_.node(index).process.Wait(absl::Seconds(5));
    }
    return index;
  }

  static GenerationOptions Options(int max_new_tokens, uint64_t seed = 0,
                                   float temperature = 0) {
    GenerationOptions options;
    options.max_new_tokens = max_new_tokens;
    options.stop_at_eos = false;
    options.sampling.temperature = temperature;
    options.sampling.top_k = temperature > 0 ? 50 : 0;
    options.sampling.seed = seed;
    return options;
  }

  LocalSwarm swarm_;
  std::map<int, std::pair<int, int>> spans_;
};

TEST_F(FailoverTest, ChatSurvivesKillBetweenTurns) {
  std::unique_ptr<Client> client = Connect();
  ASSERT_NE(client, nullptr);

  // A conversation with no failure.
  auto reference_chat = client->StartChat(256);
  ASSERT_TRUE(reference_chat.ok()) << reference_chat.status();
  auto reference_first = (*reference_chat)->Send(kStoriesPrompt, Options(16));
  auto reference_second = (*reference_chat)->Send("The cat", Options(24));
  ASSERT_TRUE(reference_first.ok()) << reference_first.status();
  ASSERT_TRUE(reference_second.ok()) << reference_second.status();
  reference_chat->reset();

  // The same conversation with the middle of the route killed in between.
  auto chat = client->StartChat(256);
  ASSERT_TRUE(chat.ok()) << chat.status();
  auto first = (*chat)->Send(kStoriesPrompt, Options(16));
  ASSERT_TRUE(first.ok()) << first.status();
  const int killed = KillBusyNode(3);
  ASSERT_GE(killed, 0) << "no node serving block 3 had a session";

  auto second = (*chat)->Send("The cat", Options(24));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(first->new_ids, reference_first->new_ids);
  EXPECT_EQ(second->new_ids, reference_second->new_ids);
  for (const RouteHopInfo& hop : second->route) {
    EXPECT_NE(hop.address, swarm_.node(killed).address);
  }
}

TEST_F(FailoverTest, ChatCommandSurvivesKilledNode) {
  const std::vector<std::string> argv = {
      PollenBinary(), "chat", "--model", Stories260kDir(), "--model-id",
      kModelId, "--initial-peers", swarm_.peer(), "--max-new-tokens", "16",
      "--max-length", "128", "--json", "--discovery-wait-s", "5"};
  const std::vector<std::string> turns = {kStoriesPrompt, "The cat", "They ran"};

  // Without a failure.
  std::vector<nlohmann::json> reference;
  {
    InteractiveCommand chat(argv);
    for (const std::string& turn : turns) {
      chat.WriteLine(turn);
      auto line = chat.ReadLine(absl::Seconds(60));
      ASSERT_TRUE(line.ok()) << line.status() << chat.StderrText();
      reference.push_back(nlohmann::json::parse(*line));
    }
    EXPECT_EQ(chat.Finish(absl::Seconds(30)), 0) << chat.StderrText();
  }

  // With the node in use for block 1 killed after the first turn and the
  // one for block 3 after the second.
  InteractiveCommand chat(argv);
  for (size_t turn = 0; turn < turns.size(); ++turn) {
    chat.WriteLine(turns[turn]);
    auto line = chat.ReadLine(absl::Seconds(60));
    ASSERT_TRUE(line.ok()) << line.status() << chat.StderrText();
    const auto output = nlohmann::json::parse(*line);
    EXPECT_EQ(output["new_ids"], reference[turn]["new_ids"]) << "turn " << turn;
    if (turn == 0) EXPECT_GE(KillBusyNode(1), 0);
    if (turn == 1) EXPECT_GE(KillBusyNode(3), 0);
  }
  EXPECT_EQ(chat.Finish(absl::Seconds(30)), 0) << chat.StderrText();
}

TEST_F(FailoverTest, RandomKillsDuringGenerationKeepTokens) {
  constexpr int kRounds = 20;
  constexpr int kNewTokens = 64;
  std::unique_ptr<Client> relaying_client = Connect();
  ASSERT_NE(relaying_client, nullptr);
  // Half of the rounds run with server-to-server push, where a kill may
  // come while a node pushes to the next one.
  std::unique_ptr<Client> pushing_client = Connect(/*push=*/true);
  ASSERT_NE(pushing_client, nullptr);
  Client* client = relaying_client.get();

  auto greedy_reference =
      client->GenerateFromIds(kStoriesPromptIds, Options(kNewTokens));
  auto sampled_reference = client->GenerateFromIds(
      kStoriesPromptIds, Options(kNewTokens, /*seed=*/11, /*temperature=*/0.8f));
  ASSERT_TRUE(greedy_reference.ok()) << greedy_reference.status();
  ASSERT_TRUE(sampled_reference.ok()) << sampled_reference.status();

  std::mt19937 random(2026);
  for (int round = 0; round < kRounds; ++round) {
    const bool sampled = round % 2 == 1;
    const bool push = round % 4 >= 2;
    client = push ? pushing_client.get() : relaying_client.get();
    // Every fourth round kills two nodes in a row.
    const int kills = round % 4 == 3 ? 2 : 1;
    const int kill_at = std::uniform_int_distribution<int>(1, kNewTokens - 2)(random);
    const int block = std::uniform_int_distribution<int>(0, 4)(random);
    SCOPED_TRACE(absl::StrCat("round ", round, ": ", kills, " kill(s) of block ",
                              block, " at token ", kill_at,
                              sampled ? ", sampled" : ", greedy",
                              push ? ", push" : ", relay"));

    std::vector<int> killed;
    int tokens = 0;
    auto on_text = [&](const std::string&) {
      ++tokens;
      // A second kill comes one token later, when the client has moved to a
      // replacement: it kills that replacement.
      if (tokens < kill_at || tokens >= kill_at + kills) return;
      const int index = KillBusyNode(block);
      if (index >= 0) killed.push_back(index);
    };
    auto result = client->GenerateFromIds(
        kStoriesPromptIds,
        sampled ? Options(kNewTokens, 11, 0.8f) : Options(kNewTokens), on_text);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->new_ids,
              sampled ? sampled_reference->new_ids : greedy_reference->new_ids);
    EXPECT_EQ(killed.size(), static_cast<size_t>(kills));

    // Bring the swarm back to three replicas for the next round.
    for (const int index : killed) {
      StartNode(spans_[index].first, spans_[index].second);
      spans_.erase(index);
    }
  }
}

// The sequences of a batch fail over one by one while the others go on,
// relayed and pushed, and each keeps its tokens.
TEST_F(FailoverTest, BatchSurvivesKilledNodes) {
  constexpr int kNewTokens = 32;
  std::vector<std::vector<int>> prompts;
  for (int i = 0; i < 3; ++i) {
    std::vector<int> prompt = kStoriesPromptIds;
    for (int j = 0; j < 2 * i; ++j) prompt.push_back(kStoriesReferenceIds[j]);
    prompts.push_back(prompt);
  }
  for (const bool push : {false, true}) {
    SCOPED_TRACE(push ? "push" : "relay");
    std::unique_ptr<Client> client = Connect(push);
    ASSERT_NE(client, nullptr);
    std::vector<std::vector<int>> expected;
    for (const std::vector<int>& prompt : prompts) {
      auto result = client->GenerateFromIds(prompt, Options(kNewTokens));
      ASSERT_TRUE(result.ok()) << result.status();
      expected.push_back(result->new_ids);
    }

    // Kill a node of each half while the batch decodes.
    std::vector<int> killed;
    int tokens = 0;
    auto on_text = [&](int sequence, const std::string&) {
      if (sequence != 0) return;
      ++tokens;
      if (tokens != 8 && tokens != 16) return;
      const int index = KillBusyNode(tokens == 8 ? 1 : 3);
      if (index >= 0) killed.push_back(index);
    };
    auto batch =
        client->GenerateBatchFromIds(prompts, Options(kNewTokens), on_text);
    ASSERT_TRUE(batch.ok()) << batch.status();
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ((*batch)[i].new_ids, expected[i]) << i;
    }
    EXPECT_EQ(killed.size(), 2u);
    for (const int index : killed) {
      StartNode(spans_[index].first, spans_[index].second);
      spans_.erase(index);
    }
  }
}

TEST_F(FailoverTest, MovedNodeLeavesOutputUnchanged) {
  std::unique_ptr<Client> client = Connect();
  ASSERT_NE(client, nullptr);
  auto reference = client->GenerateFromIds(kStoriesPromptIds, Options(48));
  ASSERT_TRUE(reference.ok()) << reference.status();

  int moved = -1;
  int tokens = 0;
  grpc::Status move_status;
  auto on_text = [&](const std::string&) {
    if (++tokens != 10) return;
    moved = BusyNode(3);
    if (moved < 0) return;
    // Ask the node serving blocks 2:5 to serve 0:2 instead.
    auto stub = v1::BlockService::NewStub(grpc::CreateChannel(
        swarm_.node(moved).address, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(30));
    v1::MoveBlocksRequest request;
    request.mutable_blocks()->set_start(0);
    request.mutable_blocks()->set_end(2);
    v1::MoveBlocksResponse response;
    move_status = stub->MoveBlocks(&context, request, &response);
  };
  auto result =
      client->GenerateFromIds(kStoriesPromptIds, Options(48), on_text);
  ASSERT_GE(moved, 0) << "no node serving block 3 had a session";
  EXPECT_TRUE(move_status.ok()) << move_status.error_message();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->new_ids, reference->new_ids);
  for (const RouteHopInfo& hop : result->route) {
    if (hop.address == swarm_.node(moved).address) {
      EXPECT_EQ(hop.end, 2) << "the moved node still runs blocks 2:5";
    }
  }
}

TEST_F(FailoverTest, SigtermMovesSessionBeforeExit) {
  std::unique_ptr<Client> client = Connect();
  ASSERT_NE(client, nullptr);
  auto reference = client->GenerateFromIds(kStoriesPromptIds, Options(48));
  ASSERT_TRUE(reference.ok()) << reference.status();

  int stopped = -1;
  int tokens = 0;
  bool alive_after_next_steps = false;
  auto on_text = [&](const std::string&) {
    ++tokens;
    if (tokens == 10) {
      stopped = BusyNode(3);
      if (stopped >= 0) swarm_.node(stopped).process.Signal(SIGTERM);
    }
    // The node drains instead of dropping the session: it is still up
    // when the client has already moved on.
    if (tokens == 12 && stopped >= 0) {
      alive_after_next_steps = swarm_.node(stopped).process.IsRunning();
    }
  };
  auto result =
      client->GenerateFromIds(kStoriesPromptIds, Options(48), on_text);
  ASSERT_GE(stopped, 0) << "no node serving block 3 had a session";
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->new_ids, reference->new_ids);
  EXPECT_TRUE(alive_after_next_steps);
  for (const RouteHopInfo& hop : result->route) {
    EXPECT_NE(hop.address, swarm_.node(stopped).address);
  }

  // With its session moved away, the node exits cleanly long before its
  // 30 s drain timeout.
  EXPECT_EQ(swarm_.node(stopped).process.Wait(absl::Seconds(15)), 0)
      << swarm_.node(stopped).process.LogTail();
}

TEST_F(FailoverTest, LosingEveryNodeOfBlockNamesIt) {
  std::unique_ptr<Client> client = Connect();
  ASSERT_NE(client, nullptr);

  int tokens = 0;
  auto on_text = [&](const std::string&) {
    if (++tokens != 5) return;
    for (const auto& [index, span] : spans_) {
      if (span.first == 2) swarm_.node(index).process.Signal(SIGKILL);
    }
  };
  const absl::Time started = absl::Now();
  auto result = client->GenerateFromIds(kStoriesPromptIds, Options(48), on_text);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(result.status().message().find("blocks 2-4"), std::string::npos)
      << result.status();
  // The client waits discovery_wait (5 s) per replacement attempt at most.
  EXPECT_LT(absl::Now() - started, absl::Seconds(60));
}

TEST_F(FailoverTest, DeadNodesAtOpenFailOnce) {
  std::unique_ptr<Client> client = Connect();
  ASSERT_NE(client, nullptr);

  // Every node of blocks 2-4 dies before the session opens, while their
  // records still look alive.
  for (const auto& [index, span] : spans_) {
    if (span.first != 2) continue;
    swarm_.node(index).process.Signal(SIGKILL);
    swarm_.node(index).process.Wait(absl::Seconds(5));
  }
  const absl::Time started = absl::Now();
  auto result = client->GenerateFromIds(kStoriesPromptIds, Options(4));
  ASSERT_FALSE(result.ok());
  const std::string message(result.status().message());
  EXPECT_NE(message.find("blocks 2-4"), std::string::npos) << message;

  // One replacement, which waits discovery_wait (5 s) once, names the
  // failure once.
  const std::string replace = "cannot replace";
  const size_t first = message.find(replace);
  ASSERT_NE(first, std::string::npos) << message;
  EXPECT_EQ(message.find(replace, first + 1), std::string::npos) << message;
  EXPECT_LT(absl::Now() - started, absl::Seconds(30));
}

// A draining node that alone serves its blocks keeps serving the session
// until its drain timeout, so the client stays on it instead of waiting
// for a replacement that does not come.
TEST(DrainingOnlyNode, SessionFinishesOnDrainingNode) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), "drain-only", 0, 5,
                               {"--drain-timeout-s", "30"});
  ASSERT_TRUE(index.ok()) << index.status();
  ClientOptions options;
  options.model_dir = Stories260kDir();
  options.model_id = "drain-only";
  options.initial_peers = {swarm.peer()};
  options.discovery_wait = absl::Seconds(10);
  options.step_timeout = absl::Seconds(10);
  auto client = Client::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();

  GenerationOptions generation;
  generation.max_new_tokens = 48;
  generation.stop_at_eos = false;
  auto reference = (*client)->GenerateFromIds(kStoriesPromptIds, generation);
  ASSERT_TRUE(reference.ok()) << reference.status();

  int tokens = 0;
  auto on_text = [&](const std::string&) {
    if (++tokens == 5) swarm.node(*index).process.Signal(SIGTERM);
  };
  const absl::Time started = absl::Now();
  auto result =
      (*client)->GenerateFromIds(kStoriesPromptIds, generation, on_text);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->new_ids, reference->new_ids);
  // Waiting for a replacement would take the 10 s discovery wait.
  EXPECT_LT(absl::Now() - started, absl::Seconds(8));

  // With its session closed, the node exits long before its drain timeout.
  EXPECT_EQ(swarm.node(*index).process.Wait(absl::Seconds(15)), 0)
      << swarm.node(*index).process.LogTail();
}

}  // namespace
}  // namespace pollen::testing
