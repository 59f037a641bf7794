// Several clients generate at once through the same nodes, whose steps then
// share batched passes and chunked prefills, and one client generates a
// batch: each sequence gets the tokens it gets alone.
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "pollen/client.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr char kModelId[] = "concurrent";
constexpr int kSessions = 4;
constexpr int kNewTokens = 40;

std::unique_ptr<Client> Connect(
    const LocalSwarm& swarm, absl::Duration discovery_wait = absl::Seconds(20)) {
  ClientOptions options;
  options.model_dir = Stories260kDir();
  options.model_id = kModelId;
  options.initial_peers = {swarm.peer()};
  options.discovery_wait = discovery_wait;
  auto client = Client::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

// Prompts of different lengths, so that the sessions decode at different
// positions.
std::vector<std::vector<int>> Prompts() {
  std::vector<std::vector<int>> prompts;
  for (int i = 0; i < kSessions; ++i) {
    std::vector<int> prompt = kStoriesPromptIds;
    for (int j = 0; j < 3 * i; ++j) prompt.push_back(kStoriesReferenceIds[j]);
    prompts.push_back(prompt);
  }
  return prompts;
}

TEST(ConcurrentSessions, GetTheirTokensAlone) {
  LocalSwarm swarm;
  // Prompts of up to 14 tokens run in chunks of 4 on the first node.
  for (const auto& [start, end, chunk] :
       std::vector<std::tuple<int, int, int>>{{0, 2, 4}, {2, 5, 512}}) {
    auto index = swarm.StartNode(Stories260kDir(), kModelId, start, end,
                                 {"--prefill-chunk", std::to_string(chunk)});
    ASSERT_TRUE(index.ok()) << index.status();
  }
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < kSessions; ++i) {
    clients.push_back(Connect(swarm));
    ASSERT_NE(clients.back(), nullptr);
  }
  const std::vector<std::vector<int>> prompts = Prompts();
  GenerationOptions greedy;
  greedy.max_new_tokens = kNewTokens;
  greedy.stop_at_eos = false;

  // Each session alone.
  std::vector<std::vector<int>> alone(kSessions);
  for (int i = 0; i < kSessions; ++i) {
    auto result = clients[i]->GenerateFromIds(prompts[i], greedy);
    ASSERT_TRUE(result.ok()) << result.status();
    alone[i] = result->new_ids;
  }
  EXPECT_EQ(std::vector<int>(alone[0].begin(), alone[0].begin() + 40),
            std::vector<int>(kStoriesReferenceIds.begin(),
                             kStoriesReferenceIds.begin() + 40));

  // All at once, twice, so that the sessions overlap in different ways.
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round);
    std::vector<absl::StatusOr<GenerationResult>> results(kSessions);
    std::vector<std::thread> threads;
    for (int i = 0; i < kSessions; ++i) {
      threads.emplace_back([&, i] {
        results[i] = clients[i]->GenerateFromIds(prompts[i], greedy);
      });
    }
    for (std::thread& thread : threads) thread.join();
    for (int i = 0; i < kSessions; ++i) {
      SCOPED_TRACE(i);
      ASSERT_TRUE(results[i].ok()) << results[i].status();
      EXPECT_EQ(results[i]->new_ids, alone[i]);
    }
  }
}

// A batch runs its sequences' decode steps together, one message per node
// and step: relayed or pushed, greedy or sampled, each sequence gets the
// tokens it gets alone.
TEST(ConcurrentSessions, BatchGetsTheTokensOfEachAlone) {
  LocalSwarm swarm;
  for (const auto& [start, end] : {std::pair{0, 2}, std::pair{2, 5}}) {
    auto index = swarm.StartNode(Stories260kDir(), kModelId, start, end);
    ASSERT_TRUE(index.ok()) << index.status();
  }
  const std::vector<std::vector<int>> prompts = Prompts();
  GenerationOptions greedy;
  greedy.max_new_tokens = kNewTokens;
  greedy.stop_at_eos = false;
  GenerationOptions sampled = greedy;
  sampled.sampling.temperature = 0.8f;
  sampled.sampling.top_k = 50;
  sampled.sampling.seed = 5;

  for (const bool push : {false, true}) {
    ClientOptions client_options;
    client_options.model_dir = Stories260kDir();
    client_options.model_id = kModelId;
    client_options.initial_peers = {swarm.peer()};
    client_options.discovery_wait = absl::Seconds(20);
    client_options.push = push;
    auto client = Client::Connect(client_options);
    ASSERT_TRUE(client.ok()) << client.status();

    for (const GenerationOptions& options : {greedy, sampled}) {
      SCOPED_TRACE(absl::StrCat(push ? "push, " : "relay, ",
                                options.sampling.temperature > 0 ? "sampled"
                                                                 : "greedy"));
      std::vector<std::vector<int>> alone;
      for (const std::vector<int>& prompt : prompts) {
        auto result = (*client)->GenerateFromIds(prompt, options);
        ASSERT_TRUE(result.ok()) << result.status();
        alone.push_back(result->new_ids);
      }

      std::vector<std::string> streamed(prompts.size());
      auto batch = (*client)->GenerateBatchFromIds(
          prompts, options, [&streamed](int sequence, const std::string& piece) {
            streamed[sequence] += piece;
          });
      ASSERT_TRUE(batch.ok()) << batch.status();
      ASSERT_EQ(batch->size(), prompts.size());
      for (size_t i = 0; i < prompts.size(); ++i) {
        SCOPED_TRACE(i);
        EXPECT_EQ((*batch)[i].new_ids, alone[i]);
        EXPECT_EQ((*batch)[i].prompt_ids, prompts[i]);
        EXPECT_EQ((*batch)[i].text, streamed[i]);
        EXPECT_EQ((*batch)[i].route.size(), 2u);
        EXPECT_EQ((*batch)[i].finish_reason, "max_new_tokens");
      }
    }
  }
}

TEST(ConcurrentSessions, BadBatchesFailBeforeAnySessionOpens) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), kModelId, 0, 5);
  ASSERT_TRUE(index.ok()) << index.status();
  std::unique_ptr<Client> client = Connect(swarm);
  ASSERT_NE(client, nullptr);
  GenerationOptions options;
  options.max_new_tokens = 4;

  auto empty = client->GenerateBatchFromIds({}, options);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.status().message().find("got 0"), std::string::npos)
      << empty.status();

  auto too_many = client->GenerateBatchFromIds(
      std::vector<std::vector<int>>(kMaxBatchPrompts + 1, {1}), options);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_many.status().message().find("257"), std::string::npos)
      << too_many.status();

  auto bad_id = client->GenerateBatchFromIds({{1, 2}, {1, 100000}}, options);
  EXPECT_EQ(bad_id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_id.status().message().find("prompt at index 1: token id 100000"),
            std::string::npos)
      << bad_id.status();

  options.max_new_tokens = 4096;
  auto too_long = client->GenerateBatch({"Once upon a time"}, options);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("prompt at index 0:"), std::string::npos)
      << too_long.status();

  // The client still works.
  options.max_new_tokens = 4;
  auto fine = client->GenerateBatch({"Once upon a time", "The cat"}, options);
  ASSERT_TRUE(fine.ok()) << fine.status();
  EXPECT_EQ(fine->size(), 2u);
}

// A batch whose sessions together need more KV cache than the node has
// fails as soon as the node rejects a session, not after the discovery
// wait, and frees what its first sessions reserved.
TEST(ConcurrentSessions, BatchBeyondTheCacheFailsAtOnce) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), kModelId, 0, 5,
                               {"--cache-tokens", "128"});
  ASSERT_TRUE(index.ok()) << index.status();
  std::unique_ptr<Client> client = Connect(swarm, absl::Seconds(120));
  ASSERT_NE(client, nullptr);
  GenerationOptions options;
  options.max_new_tokens = 40;
  options.stop_at_eos = false;

  // Four sessions of about 46 positions each need 184 of the 128 tokens.
  const absl::Time started = absl::Now();
  auto batch = client->GenerateBatchFromIds(Prompts(), options);
  EXPECT_LT(absl::Now() - started, absl::Seconds(60));
  EXPECT_EQ(batch.status().code(), absl::StatusCode::kResourceExhausted)
      << batch.status();
  // The node's rejection, or the route search's when the node's announcement
  // already shows the reserved cache.
  const std::string message(batch.status().message());
  EXPECT_TRUE(message.find("of 128 are free") != std::string::npos ||
              message.find("free KV cache") != std::string::npos)
      << message;
  EXPECT_NE(message.find("cache tokens in all"), std::string::npos) << message;

  // Two sessions fit once the failed batch's sessions are closed.
  auto fits = client->GenerateBatchFromIds(
      std::vector<std::vector<int>>(2, kStoriesPromptIds), options);
  ASSERT_TRUE(fits.ok()) << fits.status();
  EXPECT_EQ((*fits)[0].new_ids, (*fits)[1].new_ids);
}

}  // namespace
}  // namespace pollen::testing
