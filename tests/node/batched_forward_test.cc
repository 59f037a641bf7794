// Batched passes over several sessions, the float32 CPU path and chunked
// prefill give the outputs of plain one-session passes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/checkpoint.h"
#include "node/block_span.h"
#include "node/llama_block.h"
#include "node/session_manager.h"
#include "node/step_batcher.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

using pollen::testing::Stories260kDir;

// float32 rounding of different summation orders over a few blocks.
constexpr double kTolerance = 1e-4;

double MaxDifference(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

std::shared_ptr<const BlockSpan> LoadStories(
    at::ScalarType dtype = at::kFloat) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto span = BlockSpan::Load(**checkpoint, 0, 5, dtype, at::kCPU);
  EXPECT_TRUE(span.ok()) << span.status();
  return std::shared_ptr<const BlockSpan>(std::move(*span));
}

// A session run through BlockSpan::Forward alone, as the reference.
struct Sequence {
  at::Tensor prompt;  // [batch, prompt_tokens, hidden]
  at::Tensor step;    // [batch, step_tokens, hidden], fed after the prompt
};

std::vector<Sequence> MakeSequences() {
  at::manual_seed(7);
  return {
      {at::randn({1, 3, 64}), at::randn({1, 1, 64})},
      {at::randn({1, 11, 64}), at::randn({1, 1, 64})},
      {at::randn({2, 6, 64}), at::randn({2, 2, 64})},
      {at::randn({1, 1, 64}), at::randn({1, 20, 64})},
  };
}

TEST(BatchedForward, EqualsEachSessionAlone) {
  const auto span = LoadStories();
  const std::vector<Sequence> sequences = MakeSequences();

  // Each session alone: its prompt, then its step.
  std::vector<at::Tensor> expected;
  for (const Sequence& sequence : sequences) {
    auto cache = span->AllocateCache(0, 5, sequence.prompt.size(0), 40);
    ASSERT_TRUE(span->Forward(sequence.prompt, cache, 0, 0, 5).ok());
    auto output = span->Forward(sequence.step, cache,
                                sequence.prompt.size(1), 0, 5);
    ASSERT_TRUE(output.ok()) << output.status();
    expected.push_back(*output);
  }

  // The same prompts alone, then every step in one batched pass. The last
  // session's 20-token step takes the libtorch path for the whole pass.
  for (const size_t sessions : {size_t{3}, sequences.size()}) {
    SCOPED_TRACE(sessions);
    std::vector<std::vector<LayerKvCache>> caches;
    std::vector<SpanBatchEntry> entries;
    for (size_t i = 0; i < sessions; ++i) {
      caches.push_back(
          span->AllocateCache(0, 5, sequences[i].prompt.size(0), 40));
    }
    for (size_t i = 0; i < sessions; ++i) {
      ASSERT_TRUE(span->Forward(sequences[i].prompt, caches[i], 0, 0, 5).ok());
      SpanBatchEntry entry;
      entry.hidden = sequences[i].step;
      entry.cache = &caches[i];
      entry.position = sequences[i].prompt.size(1);
      entries.push_back(entry);
    }
    auto outputs = span->ForwardBatch(entries, 0, 5);
    ASSERT_TRUE(outputs.ok()) << outputs.status();
    ASSERT_EQ(outputs->size(), sessions);
    for (size_t i = 0; i < sessions; ++i) {
      SCOPED_TRACE(i);
      EXPECT_EQ((*outputs)[i].sizes(), expected[i].sizes());
      EXPECT_LT(MaxDifference((*outputs)[i], expected[i]), kTolerance);
    }
  }
}

TEST(BatchedForward, KeepsEachEntrysDtype) {
  const auto span = LoadStories();
  auto first_cache = span->AllocateCache(1, 3, 1, 8);
  auto second_cache = span->AllocateCache(1, 3, 1, 8);
  std::vector<SpanBatchEntry> entries(2);
  entries[0].hidden = at::randn({1, 2, 64});
  entries[0].cache = &first_cache;
  entries[1].hidden = at::randn({1, 3, 64}).to(at::kBFloat16);
  entries[1].cache = &second_cache;
  auto outputs = span->ForwardBatch(entries, 1, 3);
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  EXPECT_EQ((*outputs)[0].scalar_type(), at::kFloat);
  EXPECT_EQ((*outputs)[1].scalar_type(), at::kBFloat16);
  EXPECT_EQ((*outputs)[1].sizes(), (std::vector<int64_t>{1, 3, 64}));
}

TEST(BatchedForward, RejectsBadEntry) {
  const auto span = LoadStories();
  auto cache = span->AllocateCache(0, 5, 1, 4);
  std::vector<SpanBatchEntry> entries(2);
  entries[0].hidden = at::randn({1, 1, 64});
  entries[0].cache = &cache;
  entries[1].hidden = at::randn({1, 1, 64});
  entries[1].cache = &cache;
  entries[1].position = 4;  // past the cache
  auto outputs = span->ForwardBatch(entries, 0, 5);
  EXPECT_EQ(outputs.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(span->ForwardBatch({}, 0, 5).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Random weights with grouped-query attention (8 heads, 2 kv heads).
std::unique_ptr<LlamaBlock> RandomBlock(const ModelConfig& config) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  LlamaBlockWeights weights;
  weights.input_layernorm = at::rand({hidden}) + 0.5;
  weights.q_proj = at::randn({q_out, hidden}) * 0.1;
  weights.k_proj = at::randn({kv_out, hidden}) * 0.1;
  weights.v_proj = at::randn({kv_out, hidden}) * 0.1;
  weights.o_proj = at::randn({hidden, q_out}) * 0.1;
  weights.post_attention_layernorm = at::rand({hidden}) + 0.5;
  weights.gate_proj = at::randn({config.intermediate_size, hidden}) * 0.1;
  weights.up_proj = at::randn({config.intermediate_size, hidden}) * 0.1;
  weights.down_proj = at::randn({hidden, config.intermediate_size}) * 0.1;
  auto rotary = std::make_shared<const RotaryEmbedding>(
      config, config.max_position_embeddings, at::kFloat, at::kCPU);
  return std::make_unique<LlamaBlock>(0, config, std::move(weights), rotary);
}

// The float32 CPU loops against the libtorch operators, for a head
// dimension that takes the scalar attention loop (12) and for ones that
// take the vector loops (8, 16, 64).
class FloatCpuPath : public ::testing::TestWithParam<int64_t> {};

TEST_P(FloatCpuPath, MatchesLibtorchPath) {
  const int64_t head_dim = GetParam();
  ModelConfig config;
  config.hidden_size = 96;
  config.intermediate_size = 204;  // not a multiple of 8: the loops' scalar tails run
  config.num_attention_heads = 8;
  config.num_key_value_heads = 2;
  config.head_dim = head_dim;
  config.max_position_embeddings = 64;
  config.rms_norm_eps = 1e-5;
  config.rope_theta = 10000;
  at::manual_seed(3);
  const std::unique_ptr<LlamaBlock> block = RandomBlock(config);

  // The same steps through both paths: with autograd on, the block takes
  // its libtorch operators; under NoGradGuard, the float32 CPU loops.
  const std::vector<int64_t> steps = {5, 1, 1, 16, 3, 1};
  const at::Tensor hidden = at::randn({2, 27, 96});
  // Steps attend over up to 27 positions: whole blocks of 8 keys and a
  // rest.
  LayerKvCache reference_cache{at::zeros({2, 2, 30, head_dim}),
                               at::zeros({2, 2, 30, head_dim})};
  LayerKvCache fast_cache{at::zeros({2, 2, 30, head_dim}),
                          at::zeros({2, 2, 30, head_dim})};
  int64_t position = 0;
  for (const int64_t tokens : steps) {
    SCOPED_TRACE(position);
    const at::Tensor input = hidden.narrow(1, position, tokens);
    at::Tensor reference;
    {
      at::AutoGradMode grad(true);
      reference = block->Forward(input, reference_cache, position).detach();
    }
    at::Tensor fast;
    {
      at::NoGradGuard no_grad;
      fast = block->Forward(input, fast_cache, position);
    }
    EXPECT_LT(MaxDifference(fast, reference), 1e-5);
    position += tokens;
  }
  EXPECT_LT(MaxDifference(fast_cache.keys, reference_cache.keys), 1e-5);
  EXPECT_LT(MaxDifference(fast_cache.values, reference_cache.values), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(HeadDims, FloatCpuPath,
                         ::testing::Values(12, 8, 16, 64));

// Sessions on a SessionManager over the stories260k span, run through
// SubmitStep.
class StepBatcherTest : public ::testing::Test {
 protected:
  void SetUp() override { span_ = LoadStories(); }

  std::unique_ptr<SessionManager> MakeManager(int64_t chunk_tokens) {
    SessionLimits limits;
    limits.cache_token_budget = 100000;
    limits.prefill_chunk_tokens = chunk_tokens;
    return std::make_unique<SessionManager>(limits);
  }

  std::shared_ptr<Session> OpenSession(SessionManager& manager,
                                       const std::string& id,
                                       int64_t batch = 1) {
    SessionRequest request;
    request.session_id = id;
    request.from = 0;
    request.to = 5;
    request.batch_size = batch;
    request.max_length = 64;
    auto session = manager.Open(request, span_);
    EXPECT_TRUE(session.ok()) << session.status();
    return session.ok() ? *session : nullptr;
  }

  // Runs one step and waits for its result.
  static absl::StatusOr<at::Tensor> RunStep(SessionManager& manager,
                                            std::shared_ptr<Session> session,
                                            const at::Tensor& hidden,
                                            int64_t position) {
    absl::StatusOr<at::Tensor> result;
    absl::Notification done;
    StepTask task;
    task.session = std::move(session);
    task.hidden = hidden;
    task.position = position;
    task.done = [&](absl::StatusOr<at::Tensor> output) {
      result = std::move(output);
      done.Notify();
    };
    manager.SubmitStep(std::move(task));
    done.WaitForNotification();
    return result;
  }

  // Opens sessions "early" and "late" and runs the step at position 0 of
  // each. Returns fewer than two sessions when that fails.
  std::vector<std::shared_ptr<Session>> OpenSteppedSessions(
      SessionManager& manager) {
    std::vector<std::shared_ptr<Session>> sessions = {
        OpenSession(manager, "early"), OpenSession(manager, "late")};
    for (const auto& session : sessions) {
      if (session == nullptr) return {};
      const absl::StatusOr<at::Tensor> output =
          RunStep(manager, session, at::randn({1, 1, 64}), 0);
      EXPECT_TRUE(output.ok()) << output.status();
      if (!output.ok()) return {};
    }
    return sessions;
  }

  // Runs two sessions whose steps come back half a round apart, as when
  // they sit at different nodes of a chain: `steps` steps each from
  // position `first_step`. Returns the passes they took.
  static int64_t RunOutOfPhase(
      SessionManager& manager,
      const std::vector<std::shared_ptr<Session>>& sessions, int first_step,
      int steps) {
    constexpr absl::Duration kRestOfChain = absl::Milliseconds(20);
    const int64_t passes_before = manager.batcher().passes_run();
    std::vector<std::thread> clients;
    std::atomic<int> failures{0};
    for (int i = 0; i < 2; ++i) {
      clients.emplace_back([&, i] {
        absl::SleepFor(kRestOfChain / 2 * i);
        for (int step = first_step; step < first_step + steps; ++step) {
          if (!RunStep(manager, sessions[i], at::randn({1, 1, 64}), step).ok()) {
            ++failures;
          }
          absl::SleepFor(kRestOfChain);
        }
      });
    }
    for (std::thread& client : clients) client.join();
    EXPECT_EQ(failures.load(), 0);
    return manager.batcher().passes_run() - passes_before;
  }

  std::shared_ptr<const BlockSpan> span_;
};

TEST_F(StepBatcherTest, ChunkedPrefillEqualsOnePass) {
  at::manual_seed(11);
  const at::Tensor prompt = at::randn({2, 23, 64});
  const at::Tensor token = at::randn({2, 1, 64});

  auto cache = span_->AllocateCache(0, 5, 2, 64);
  auto whole = span_->Forward(prompt, cache, 0, 0, 5);
  ASSERT_TRUE(whole.ok()) << whole.status();
  auto next = span_->Forward(token, cache, 23, 0, 5);
  ASSERT_TRUE(next.ok()) << next.status();

  // Chunks of 5 tokens: 2 sequences of 2 positions per pass, and a last
  // chunk of 1.
  auto manager = MakeManager(5);
  auto session = OpenSession(*manager, "chunked", 2);
  auto chunked = RunStep(*manager, session, prompt, 0);
  ASSERT_TRUE(chunked.ok()) << chunked.status();
  EXPECT_EQ(chunked->sizes(), prompt.sizes());
  EXPECT_LT(MaxDifference(*chunked, *whole), kTolerance);
  {
    absl::MutexLock lock(&session->mu);
    EXPECT_EQ(session->position, 23);
  }
  auto decoded = RunStep(*manager, session, token, 23);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_LT(MaxDifference(*decoded, *next), kTolerance);
}

TEST_F(StepBatcherTest, ChecksPositionAndLength) {
  auto manager = MakeManager(512);
  auto session = OpenSession(*manager, "checked");
  auto wrong = RunStep(*manager, session, at::randn({1, 2, 64}), 3);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kAborted);
  auto too_long = RunStep(*manager, session, at::randn({1, 65, 64}), 0);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);

  manager->Close("checked", "test");
  auto closed = RunStep(*manager, session, at::randn({1, 1, 64}), 0);
  EXPECT_EQ(closed.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(StepBatcherTest, StepsQueuedTogetherShareOnePass) {
  auto manager = MakeManager(512);
  at::manual_seed(5);
  constexpr int kSessions = 4;
  std::vector<std::shared_ptr<Session>> sessions;
  std::vector<at::Tensor> prompts;
  std::vector<at::Tensor> tokens;
  for (int i = 0; i < kSessions; ++i) {
    sessions.push_back(OpenSession(*manager, absl::StrCat("s", i)));
    prompts.push_back(at::randn({1, 2 + i, 64}));
    tokens.push_back(at::randn({1, 1, 64}));
    ASSERT_TRUE(RunStep(*manager, sessions[i], prompts[i], 0).ok());
  }

  // Expected: each session's decode step alone.
  std::vector<at::Tensor> expected;
  for (int i = 0; i < kSessions; ++i) {
    auto cache = span_->AllocateCache(0, 5, 1, 64);
    ASSERT_TRUE(span_->Forward(prompts[i], cache, 0, 0, 5).ok());
    auto output = span_->Forward(tokens[i], cache, 2 + i, 0, 5);
    ASSERT_TRUE(output.ok());
    expected.push_back(*output);
  }

  // Session 0's step runs first. Its done callback queues the other three
  // steps from other threads, so they run together in the next pass.
  const int64_t passes_before = manager->batcher().passes_run();
  std::vector<absl::StatusOr<at::Tensor>> results(kSessions);
  absl::Notification all_done;
  std::atomic<int> remaining{kSessions};
  auto make_task = [&](int i) {
    StepTask task;
    task.session = sessions[i];
    task.hidden = tokens[i];
    task.position = 2 + i;
    task.done = [&, i](absl::StatusOr<at::Tensor> output) {
      results[i] = std::move(output);
      if (--remaining == 0) all_done.Notify();
    };
    return task;
  };
  StepTask first = make_task(0);
  auto report_first = std::move(first.done);
  first.done = [&](absl::StatusOr<at::Tensor> output) {
    std::vector<std::thread> submitters;
    for (int i = 1; i < kSessions; ++i) {
      submitters.emplace_back(
          [&, i] { manager->SubmitStep(make_task(i)); });
    }
    for (std::thread& submitter : submitters) submitter.join();
    report_first(std::move(output));
  };
  manager->SubmitStep(std::move(first));
  all_done.WaitForNotification();

  EXPECT_EQ(manager->batcher().passes_run() - passes_before, 2);
  for (int i = 0; i < kSessions; ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(results[i].ok()) << results[i].status();
    EXPECT_LT(MaxDifference(*results[i], expected[i]), kTolerance);
  }
}

// This node holds the sessions' first block, so a pass waits for the other
// active session, and after a few rounds the two share every pass instead
// of running one pass each.
TEST_F(StepBatcherTest, OutOfPhaseSessionsRegroupAtFirstHop) {
  auto manager = MakeManager(512);
  constexpr int kSteps = 20;
  const std::vector<std::shared_ptr<Session>> sessions =
      OpenSteppedSessions(*manager);
  ASSERT_EQ(sessions.size(), 2u);

  // One pass per step and session without regrouping: 2 * kSteps. The
  // first rounds run apart until the batcher has measured a round, and a
  // loaded machine can split a few more.
  EXPECT_LE(RunOutOfPhase(*manager, sessions, 1, kSteps), kSteps * 3 / 2);
}

// The first round the batcher measures is a fraction of a millisecond, so
// the other session soon looks inactive. Its steps must still measure
// rounds, or the estimate stays that short and no pass ever waits.
TEST_F(StepBatcherTest, RegroupAfterShortFirstRound) {
  auto manager = MakeManager(512);
  constexpr int kSteps = 20;
  const std::vector<std::shared_ptr<Session>> sessions =
      OpenSteppedSessions(*manager);
  ASSERT_EQ(sessions.size(), 2u);
  ASSERT_TRUE(RunStep(*manager, sessions[0], at::randn({1, 1, 64}), 1).ok());
  ASSERT_TRUE(RunStep(*manager, sessions[1], at::randn({1, 1, 64}), 1).ok());

  EXPECT_LE(RunOutOfPhase(*manager, sessions, 2, kSteps), kSteps * 3 / 2);
}

}  // namespace
}  // namespace pollen::node
