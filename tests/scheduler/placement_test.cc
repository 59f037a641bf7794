#include "scheduler/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "scheduler/petals_policy.h"

namespace pollen::scheduler {
namespace {

ServerSpan Span(const std::string& id, int start, int end, double throughput) {
  ServerSpan span;
  span.node_id = id;
  span.start = start;
  span.end = end;
  span.throughput = throughput;
  return span;
}

// The swarm's minimum block throughput after adding `throughput` on
// [start, start + length).
double MinAfterPlacing(std::vector<double> throughputs, int start, int length,
                       double throughput) {
  for (int block = start; block < start + length; ++block) {
    throughputs[block] += throughput;
  }
  return *std::min_element(throughputs.begin(), throughputs.end());
}

std::vector<ServerSpan> RandomSwarm(std::mt19937_64& rng, int num_blocks,
                                    int num_spans) {
  std::vector<ServerSpan> spans;
  for (int i = 0; i < num_spans; ++i) {
    const int length = 1 + static_cast<int>(rng() % num_blocks);
    const int start = static_cast<int>(rng() % (num_blocks - length + 1));
    // Whole numbers make equal sums exact, so ties really occur.
    spans.push_back(Span(absl::StrCat("n", i), start, start + length,
                         1 + static_cast<double>(rng() % 5)));
  }
  return spans;
}

TEST(BlockThroughputs, SumsCoveringSpans) {
  const std::vector<double> throughputs = BlockThroughputs(
      {Span("a", 0, 2, 3), Span("b", 1, 4, 2), Span("c", 3, 4, 0.5)}, 5);
  EXPECT_EQ(throughputs, (std::vector<double>{3, 5, 2, 2.5, 0}));
}

TEST(BlockThroughputs, ClipsAndIgnoresNonPositive) {
  const std::vector<double> throughputs = BlockThroughputs(
      {Span("a", -2, 1, 1), Span("b", 2, 9, 2), Span("c", 0, 3, -5)}, 3);
  EXPECT_EQ(throughputs, (std::vector<double>{1, 0, 2}));
}

TEST(BlocksThatFit, FloorsTheQuotient) {
  EXPECT_EQ(BlocksThatFit(24'000, 1'700, 64, 2'000), 12);
}

TEST(BlocksThatFit, ReserveAboveMemoryFitsNone) {
  EXPECT_EQ(BlocksThatFit(1'000, 100, 0, 2'000), 0);
}

TEST(BlocksThatFit, NonPositiveBlockSizeFitsNone) {
  EXPECT_EQ(BlocksThatFit(1'000, 0, 0, 0), 0);
  EXPECT_EQ(BlocksThatFit(1'000, -5, 2, 0), 0);
}

TEST(BlocksThatFit, HugeMemoryIsCapped) {
  EXPECT_EQ(BlocksThatFit(std::numeric_limits<int64_t>::max(), 1, 0, 0),
            std::numeric_limits<int>::max());
}

TEST(ChooseSpanStart, FillsUnservedBlocks) {
  std::mt19937_64 rng(1);
  EXPECT_EQ(ChooseSpanStart({Span("a", 0, 6, 10)}, 10, 4, 1, rng), 6);
}

TEST(ChooseSpanStart, MatchesBruteForceWithoutJitter) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 500; ++trial) {
    const int num_blocks = 2 + static_cast<int>(rng() % 11);
    const std::vector<ServerSpan> others =
        RandomSwarm(rng, num_blocks, static_cast<int>(rng() % 7));
    const int length = 1 + static_cast<int>(rng() % num_blocks);
    const double throughput = 1 + static_cast<double>(rng() % 6);
    const std::vector<double> before = BlockThroughputs(others, num_blocks);

    double best = -1;
    for (int start = 0; start + length <= num_blocks; ++start) {
      best = std::max(best, MinAfterPlacing(before, start, length, throughput));
    }
    const int chosen =
        ChooseSpanStart(others, num_blocks, length, throughput, rng, 0);
    ASSERT_GE(chosen, 0) << "trial " << trial;
    ASSERT_LE(chosen + length, num_blocks) << "trial " << trial;
    EXPECT_DOUBLE_EQ(MinAfterPlacing(before, chosen, length, throughput), best)
        << "trial " << trial;
  }
}

// One span per block with the given throughputs.
std::vector<ServerSpan> PerBlockSwarm(const std::vector<double>& throughputs) {
  std::vector<ServerSpan> spans;
  for (size_t block = 0; block < throughputs.size(); ++block) {
    spans.push_back(
        Span(absl::StrCat("b", block), block, block + 1, throughputs[block]));
  }
  return spans;
}

TEST(ChooseSpanStart, BreaksTiesTowardWeakBlocks) {
  // Blocks 0 and 5 are both at 1, so no window of 2 lifts the minimum. The
  // second score prefers blocks 4-5 (2 and 1) over blocks 0-1 (1 and 3).
  std::mt19937_64 rng(2);
  EXPECT_EQ(ChooseSpanStart(PerBlockSwarm({1, 3, 9, 9, 2, 1}), 6, 2, 1, rng, 0),
            4);
}

TEST(ChooseSpanStart, JitterSpreadsChoices) {
  // Blocks 2 and 15 are at 5, so every start leaves the minimum at 5. Blocks
  // 14 and 16 are nearly as weak, which makes start 14 the single best by
  // the second score.
  std::vector<double> throughputs(20, 10);
  throughputs[2] = 5;
  throughputs[14] = 5.2;
  throughputs[15] = 5;
  throughputs[16] = 5.4;
  const std::vector<ServerSpan> swarm = PerBlockSwarm(throughputs);

  std::mt19937_64 rng(3);
  std::set<int> exact;
  std::set<int> jittered;
  for (int i = 0; i < 200; ++i) {
    exact.insert(ChooseSpanStart(swarm, 20, 2, 1, rng, 0));
    jittered.insert(ChooseSpanStart(swarm, 20, 2, 1, rng, 0.5));
  }
  EXPECT_EQ(exact, (std::set<int>{14}));
  EXPECT_EQ(jittered, (std::set<int>{1, 2, 14, 15}));
}

TEST(ChooseSpanStart, EmptySwarmStartsAnywhere) {
  std::mt19937_64 rng(4);
  std::set<int> starts;
  for (int i = 0; i < 200; ++i)
    starts.insert(ChooseSpanStart({}, 10, 3, 1, rng));
  EXPECT_EQ(starts.size(), 8u);
}

TEST(ChooseSpanStart, ClampsLength) {
  std::mt19937_64 rng(5);
  EXPECT_EQ(ChooseSpanStart({}, 5, 9, 1, rng), 0);
  const int start = ChooseSpanStart({Span("a", 0, 4, 1)}, 5, 0, 1, rng);
  EXPECT_EQ(start, 4);
  EXPECT_EQ(ChooseSpanStart({}, 0, 3, 1, rng), 0);
}

TEST(ChooseSpanStart, NonFiniteThroughputsCountAsZero) {
  std::mt19937_64 rng(7);
  const std::vector<ServerSpan> others = {
      Span("inf", 0, 3, std::numeric_limits<double>::infinity()),
      Span("nan", 3, 6, std::numeric_limits<double>::quiet_NaN()),
      Span("a", 0, 6, 1)};
  EXPECT_EQ(BlockThroughputs(others, 6), std::vector<double>(6, 1));
  const int start = ChooseSpanStart(
      others, 6, 2, std::numeric_limits<double>::quiet_NaN(), rng);
  EXPECT_GE(start, 0);
  EXPECT_LE(start, 4);
}

TEST(ChooseSpanStart, SameSeedSameStart) {
  std::mt19937_64 rng(6);
  const std::vector<ServerSpan> others = RandomSwarm(rng, 30, 12);
  std::mt19937_64 first(42);
  std::mt19937_64 second(42);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(ChooseSpanStart(others, 30, 5, 2, first),
              ChooseSpanStart(others, 30, 5, 2, second));
  }
}

TEST(DecideMove, StaysWhenBalanced) {
  std::mt19937_64 rng(1);
  const MoveDecision decision = DecideMove(
      {Span("self", 0, 4, 5), Span("a", 4, 8, 5)}, "self", 8, 1.2, rng);
  EXPECT_FALSE(decision.move);
  EXPECT_EQ(decision.new_start, 0);
  EXPECT_DOUBLE_EQ(decision.current_min, 5);
}

TEST(DecideMove, MovesToUnservedBlocks) {
  std::mt19937_64 rng(2);
  const MoveDecision decision = DecideMove(
      {Span("self", 0, 5, 2), Span("a", 0, 5, 3)}, "self", 10, 1.2, rng);
  EXPECT_TRUE(decision.move);
  EXPECT_EQ(decision.new_start, 5);
  EXPECT_DOUBLE_EQ(decision.current_min, 0);
  EXPECT_DOUBLE_EQ(decision.new_min, 2);
}

TEST(DecideMove, KeepsBlocksOnlyItServes) {
  // self alone serves blocks 0-1; moving to 6-9 would serve more blocks
  // overall but drop those two.
  std::mt19937_64 rng(3);
  const MoveDecision decision = DecideMove(
      {Span("self", 0, 4, 2), Span("a", 2, 6, 3)}, "self", 10, 1.2, rng);
  EXPECT_FALSE(decision.move);
  EXPECT_EQ(decision.new_start, 0);
}

TEST(DecideMove, HysteresisBlocksSmallGain) {
  // Moving self (1 step/s) from block 0 to block 1 lifts the minimum from 9
  // to 10, 11% better.
  const std::vector<ServerSpan> spans = {
      Span("self", 0, 1, 1), Span("a", 0, 1, 10), Span("b", 1, 2, 9)};
  std::mt19937_64 rng(4);
  const MoveDecision strict = DecideMove(spans, "self", 2, 1.2, rng);
  EXPECT_FALSE(strict.move);
  EXPECT_DOUBLE_EQ(strict.current_min, 9);
  EXPECT_DOUBLE_EQ(strict.new_min, 10);

  const MoveDecision loose = DecideMove(spans, "self", 2, 1.1, rng);
  EXPECT_TRUE(loose.move);
  EXPECT_EQ(loose.new_start, 1);
}

TEST(DecideMove, AbsentNodeStays) {
  std::mt19937_64 rng(5);
  const MoveDecision decision =
      DecideMove({Span("a", 0, 2, 1)}, "missing", 4, 1.2, rng);
  EXPECT_FALSE(decision.move);
}

TEST(DecideMove, ThroughputsVariantAgrees) {
  std::mt19937_64 swarm_rng(6);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<ServerSpan> spans = RandomSwarm(swarm_rng, 12, 6);
    spans[0].node_id = "self";
    std::mt19937_64 first(trial);
    std::mt19937_64 second(trial);
    const MoveDecision by_spans = DecideMove(spans, "self", 12, 1.1, first);
    const MoveDecision by_throughputs = DecideMoveForThroughputs(
        BlockThroughputs(spans, 12), spans[0].start, spans[0].end,
        spans[0].throughput, 1.1, second);
    EXPECT_EQ(by_spans.move, by_throughputs.move) << "trial " << trial;
    EXPECT_EQ(by_spans.new_start, by_throughputs.new_start)
        << "trial " << trial;
  }
}

TEST(PetalsBestStart, LexicographicallySmallestWindow) {
  // Sorted windows: (1,5) (1,5) (1,5) (1,2) (2,5); the smallest starts at 3.
  EXPECT_EQ(PetalsChooseBestStart({5, 1, 5, 1, 2, 5}, 2), 3);
}

TEST(PetalsBestStart, TiesGoToFirstStart) {
  EXPECT_EQ(PetalsChooseBestStart({0, 0, 0, 0}, 2), 0);
  EXPECT_EQ(PetalsChooseBestStart({3, 1, 1, 3, 1, 1}, 2), 1);
}

TEST(PetalsBestStart, MatchesBruteForce) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    const int num_blocks = 1 + static_cast<int>(rng() % 12);
    std::vector<double> throughputs(num_blocks);
    for (double& value : throughputs) value = static_cast<double>(rng() % 4);
    const int length = 1 + static_cast<int>(rng() % num_blocks);

    int expected = 0;
    std::vector<double> best;
    for (int start = 0; start + length <= num_blocks; ++start) {
      std::vector<double> window(throughputs.begin() + start,
                                 throughputs.begin() + start + length);
      std::sort(window.begin(), window.end());
      if (start == 0 || window < best) {
        best = window;
        expected = start;
      }
    }
    EXPECT_EQ(PetalsChooseBestStart(throughputs, length), expected)
        << "trial " << trial;
  }
}

TEST(PetalsDecideMove, StaysWhenBalanced) {
  std::mt19937_64 rng(1);
  const MoveDecision decision =
      PetalsDecideMove({Span("self", 0, 2, 5), Span("a", 2, 4, 5)}, "self", 4,
                       kPetalsBalanceQuality, rng);
  EXPECT_FALSE(decision.move);
}

TEST(PetalsDecideMove, MovesWhenSwarmCanBeMuchStronger) {
  // Blocks 0-1 have 20 steps/s and blocks 2-3 have 1; moving self to 2-3
  // makes the minimum 10, far beyond 1 / 0.75.
  std::mt19937_64 rng(2);
  const MoveDecision decision = PetalsDecideMove(
      {Span("self", 0, 2, 10), Span("a", 0, 2, 10), Span("b", 2, 4, 1)}, "self",
      4, kPetalsBalanceQuality, rng);
  EXPECT_TRUE(decision.move);
  EXPECT_EQ(decision.new_start, 2);
  EXPECT_DOUBLE_EQ(decision.current_min, 1);
  EXPECT_NEAR(decision.new_min, 10, 1e-6);
}

TEST(PetalsDecideMove, StaysWhenItWouldDisconnect) {
  std::mt19937_64 rng(3);
  const MoveDecision decision =
      PetalsDecideMove({Span("self", 0, 2, 10), Span("b", 2, 4, 1)}, "self", 4,
                       kPetalsBalanceQuality, rng);
  EXPECT_FALSE(decision.move);
}

TEST(PetalsDecideMove, QualityAboveOneForcesMove) {
  std::mt19937_64 rng(4);
  const MoveDecision decision = PetalsDecideMove(
      {Span("self", 0, 2, 5), Span("a", 2, 4, 5)}, "self", 4, 1.5, rng);
  EXPECT_TRUE(decision.move);
}

TEST(PetalsDecideMove, ThroughputsVariantAgrees) {
  std::mt19937_64 swarm_rng(8);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<ServerSpan> spans = RandomSwarm(swarm_rng, 10, 6);
    spans[trial % 6].node_id = "self";
    std::mt19937_64 first(trial);
    std::mt19937_64 second(trial);
    const MoveDecision by_spans =
        PetalsDecideMove(spans, "self", 10, kPetalsBalanceQuality, first);
    const MoveDecision by_throughputs =
        PetalsDecideMoveForThroughputs(BlockThroughputs(spans, 10), spans,
                                       "self", kPetalsBalanceQuality, second);
    EXPECT_EQ(by_spans.move, by_throughputs.move) << "trial " << trial;
    EXPECT_EQ(by_spans.new_start, by_throughputs.new_start)
        << "trial " << trial;
  }
}

}  // namespace
}  // namespace pollen::scheduler
