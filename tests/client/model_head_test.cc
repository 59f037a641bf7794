#include "client/model_head.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "client/bench/random_checkpoint.h"
#include "common/checkpoint.h"
#include "node/block_span.h"
#include "tests/support/checkpoint_fixtures.h"
#include "tests/support/test_support.h"

namespace pollen::client {
namespace {

using ::pollen::testing::kStoriesPromptIds;
using ::pollen::testing::kStoriesReferenceIds;
using ::pollen::testing::Stories260kDir;
using ::pollen::testing::TempDir;

at::Tensor IdsTensor(const std::vector<int>& ids) {
  return at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong)
      .unsqueeze(0);
}

// Greedy decoding in process: a prefill of the prompt, then one decode step
// per new token, each feeding back the argmax of the last logits.
std::vector<int> GreedyDecode(const std::string& model_dir,
                              const std::vector<int>& prompt, int new_tokens,
                              at::ScalarType dtype) {
  auto checkpoint = Checkpoint::Open(model_dir);
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  if (!checkpoint.ok()) return {};
  auto head = ModelHead::Load(**checkpoint, dtype, at::kCPU);
  EXPECT_TRUE(head.ok()) << head.status();
  const int blocks = static_cast<int>((*checkpoint)->config().num_hidden_layers);
  auto span = node::BlockSpan::Load(**checkpoint, 0, blocks, dtype, at::kCPU);
  EXPECT_TRUE(span.ok()) << span.status();
  if (!head.ok() || !span.ok()) return {};

  const int64_t max_length = static_cast<int64_t>(prompt.size()) + new_tokens;
  std::vector<node::LayerKvCache> cache =
      (*span)->AllocateCache(0, blocks, 1, max_length);
  std::vector<int> generated;
  std::vector<int> to_feed = prompt;
  int64_t position = 0;
  while (static_cast<int>(generated.size()) < new_tokens) {
    const at::Tensor hidden = (*head)->Embed(IdsTensor(to_feed));
    auto output = (*span)->Forward(hidden, cache, position, 0, blocks);
    EXPECT_TRUE(output.ok()) << output.status();
    if (!output.ok()) break;
    const at::Tensor logits = (*head)->Logits(output->narrow(1, -1, 1));
    const int next = static_cast<int>(logits.argmax(-1).item<int64_t>());
    position += static_cast<int64_t>(to_feed.size());
    generated.push_back(next);
    to_feed = {next};
  }
  return generated;
}

TEST(ModelHead, Shapes) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto head = ModelHead::Load(**checkpoint, at::kFloat, at::kCPU);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ((*head)->config().vocab_size, 512);

  const at::Tensor embedded = (*head)->Embed(IdsTensor({1, 2, 3}));
  EXPECT_EQ(embedded.sizes(), (at::IntArrayRef{1, 3, 64}));
  EXPECT_EQ(embedded.scalar_type(), at::kFloat);

  const at::Tensor logits = (*head)->Logits(at::randn({2, 3, 64}));
  EXPECT_EQ(logits.sizes(), (at::IntArrayRef{2, 3, 512}));
  EXPECT_EQ(logits.scalar_type(), at::kFloat);

  const at::Tensor bf16_logits =
      (*head)->Logits(at::randn({1, 1, 64}).to(at::kBFloat16));
  EXPECT_EQ(bf16_logits.scalar_type(), at::kFloat);
}

// Calls Logits from 8 threads at once and checks that every call gets
// exactly the logits it gets alone, including calls of several rows.
void ExpectConcurrentLogitsEqualAlone(const ModelHead& head) {
  const int64_t hidden = head.config().hidden_size;
  constexpr int kThreads = 8;
  constexpr int kCalls = 50;
  at::manual_seed(3);
  std::vector<std::vector<at::Tensor>> inputs(kThreads);
  std::vector<std::vector<at::Tensor>> alone(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (int c = 0; c < kCalls; ++c) {
      inputs[t].push_back(at::randn({1, 1 + (t + c) % 3, hidden}));
      alone[t].push_back(head.Logits(inputs[t].back()));
    }
  }

  std::vector<std::vector<at::Tensor>> together(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (const at::Tensor& input : inputs[t]) {
        together[t].push_back(head.Logits(input));
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  for (int t = 0; t < kThreads; ++t) {
    for (int c = 0; c < kCalls; ++c) {
      ASSERT_TRUE(at::equal(together[t][c], alone[t][c]))
          << "thread " << t << ", call " << c;
    }
  }
}

// stories260k's LM head (128 KiB) is small, so each thread computes its
// own product.
TEST(ModelHead, ConcurrentLogitsOfSmallHead) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto head = ModelHead::Load(**checkpoint, at::kFloat, at::kCPU);
  ASSERT_TRUE(head.ok()) << head.status();
  ExpectConcurrentLogitsEqualAlone(**head);
}

// stories260k's small head takes the transposed product. Its logits must
// equal libtorch's norm and linear layer up to rounding, for row counts
// up to the loops' limit and one past it.
TEST(ModelHead, SmallHeadLogitsMatchLibtorch) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto head = ModelHead::Load(**checkpoint, at::kFloat, at::kCPU);
  ASSERT_TRUE(head.ok()) << head.status();
  auto norm =
      (*checkpoint)->LoadTensor("model.norm.weight", at::kFloat, at::kCPU);
  ASSERT_TRUE(norm.ok()) << norm.status();
  // stories260k ties its LM head to the embeddings.
  const std::string head_name = (*checkpoint)->HasTensor("lm_head.weight")
                                    ? "lm_head.weight"
                                    : "model.embed_tokens.weight";
  auto weight = (*checkpoint)->LoadTensor(head_name, at::kFloat, at::kCPU);
  ASSERT_TRUE(weight.ok()) << weight.status();

  at::manual_seed(5);
  for (int64_t rows : {1, 3, 8, 16, 17}) {
    const at::Tensor hidden = at::randn({rows, 1, 64});
    const at::Tensor variance = hidden.pow(2).mean(-1, /*keepdim=*/true);
    const at::Tensor normed =
        *norm *
        (hidden * at::rsqrt(variance + (*checkpoint)->config().rms_norm_eps));
    const at::Tensor want = at::linear(normed, *weight);
    const at::Tensor got = (*head)->Logits(hidden);
    ASSERT_EQ(got.sizes(), want.sizes()) << "rows " << rows;
    EXPECT_TRUE(at::allclose(got, want, 1e-4, 1e-4))
        << "rows " << rows << ", largest difference "
        << (got - want).abs().max().item<float>();
  }
}

// An 8 MiB LM head: concurrent calls share its products.
TEST(ModelHead, ConcurrentLogitsShareLargeHead) {
  TempDir dir;
  bench::RandomCheckpointOptions options;
  options.shape = *bench::FindCheckpointShape("test-tiny");
  options.shape.vocab_size = 32768;
  options.out_dir = dir.path() + "/model";
  auto written = bench::WriteRandomCheckpoint(options);
  ASSERT_TRUE(written.ok()) << written.status();
  auto checkpoint = Checkpoint::Open(options.out_dir);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto head = ModelHead::Load(**checkpoint, at::kFloat, at::kCPU);
  ASSERT_TRUE(head.ok()) << head.status();
  ExpectConcurrentLogitsEqualAlone(**head);
}

TEST(ModelHead, EmbedMatchesTable) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto head = ModelHead::Load(**checkpoint, at::kFloat, at::kCPU);
  ASSERT_TRUE(head.ok()) << head.status();
  const at::Tensor table = *(*checkpoint)->LoadTensor(
      "model.embed_tokens.weight", at::kFloat, at::kCPU);
  EXPECT_TRUE(at::equal((*head)->Embed(IdsTensor({403}))[0][0], table[403]));
}

TEST(ModelHead, EmbedOutOfRangeThrows) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto head = ModelHead::Load(**checkpoint, at::kFloat, at::kCPU);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_THROW((*head)->Embed(IdsTensor({512})), c10::Error);
}

TEST(ModelHead, UntiedNeedsLmHead) {
  TempDir dir;
  ASSERT_TRUE(pollen::testing::MakeShardedCopy(Stories260kDir(), dir.path()).ok());
  nlohmann::json config;
  std::ifstream(dir.path() + "/config.json") >> config;
  config["tie_word_embeddings"] = false;
  std::ofstream(dir.path() + "/config.json") << config.dump();

  auto checkpoint = Checkpoint::Open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const absl::Status status =
      ModelHead::Load(**checkpoint, at::kFloat, at::kCPU).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("lm_head.weight"), absl::string_view::npos)
      << status;
}

TEST(EndToEnd, GreedyMatchesReference) {
  EXPECT_EQ(GreedyDecode(Stories260kDir(), kStoriesPromptIds, 48, at::kFloat),
            kStoriesReferenceIds);
}

TEST(EndToEnd, ShardedGreedyMatchesReference) {
  TempDir dir;
  ASSERT_TRUE(pollen::testing::MakeShardedCopy(Stories260kDir(), dir.path()).ok());
  EXPECT_EQ(GreedyDecode(dir.path(), kStoriesPromptIds, 48, at::kFloat),
            kStoriesReferenceIds);
}

TEST(EndToEnd, Bfloat16GreedyRuns) {
  // bfloat16 rounding may change which token wins a close argmax, so only
  // the start of the reference is compared.
  const std::vector<int> generated =
      GreedyDecode(Stories260kDir(), kStoriesPromptIds, 8, at::kBFloat16);
  ASSERT_EQ(generated.size(), 8u);
  EXPECT_EQ(generated[0], kStoriesReferenceIds[0]);
}

}  // namespace
}  // namespace pollen::client
