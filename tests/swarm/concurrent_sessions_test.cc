// Several clients generate at once through the same nodes, whose steps then
// share batched passes and chunked prefills: each gets the tokens it gets
// alone.
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "pollen/client.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr char kModelId[] = "concurrent";
constexpr int kSessions = 4;
constexpr int kNewTokens = 40;

std::unique_ptr<Client> Connect(const LocalSwarm& swarm) {
  ClientOptions options;
  options.model_dir = Stories260kDir();
  options.model_id = kModelId;
  options.initial_peers = {swarm.peer()};
  options.discovery_wait = absl::Seconds(20);
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

}  // namespace
}  // namespace pollen::testing
