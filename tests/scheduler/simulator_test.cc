#include "scheduler/simulator/simulator.h"

#include <gtest/gtest.h>

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "scheduler/simulator/report.h"

namespace pollen::scheduler {
namespace {

// 30 nodes over a 20-block model with 405B-sized blocks, so that nodes hold
// 2 to 11 blocks and every block has several servers, for 2 hours.
SimulationOptions SmallSwarm(uint64_t seed = 1) {
  SimulationOptions options;
  options.model = SimulatedModel{"test-20", 20, 6'500'000'000, 4096};
  options.nodes = 30;
  options.hours = 2;
  options.churn_per_hour = 0.2;
  options.seed = seed;
  options.warmup_minutes = 20;
  options.settle_minutes = 40;
  options.route_period_minutes = 5;
  return options;
}

class SimulatorTest : public ::testing::TestWithParam<PlacementPolicy> {};

TEST_P(SimulatorTest, CoversAllBlocksAfterWarmup) {
  const SimulationOptions options = SmallSwarm();
  absl::StatusOr<SimulationResult> result = RunSimulation(options, GetParam());
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->ticks.size(), 120u);

  EXPECT_GE(result->summary.first_full_coverage_minute, 0);
  EXPECT_LE(result->summary.first_full_coverage_minute,
            options.warmup_minutes + 10);
  EXPECT_GT(result->summary.mean_coverage, 0.99);
}

TEST_P(SimulatorTest, MinThroughputWithinUpperBound) {
  absl::StatusOr<SimulationResult> result =
      RunSimulation(SmallSwarm(), GetParam());
  ASSERT_TRUE(result.ok()) << result.status();
  for (const TickStats& tick : result->ticks) {
    EXPECT_LE(tick.min_throughput, tick.upper_bound * (1 + 1e-9))
        << "minute " << tick.minute;
  }
  EXPECT_GT(result->summary.mean_min_throughput, 0);
}

TEST_P(SimulatorTest, RouteLatencyAtLeastOptimum) {
  absl::StatusOr<SimulationResult> result =
      RunSimulation(SmallSwarm(), GetParam());
  ASSERT_TRUE(result.ok()) << result.status();
  int routed = 0;
  for (const TickStats& tick : result->ticks) {
    if (!tick.routed) continue;
    ++routed;
    EXPECT_GE(tick.route_ms, tick.optimal_ms * (1 - 1e-9))
        << "minute " << tick.minute;
    EXPECT_GE(tick.fewest_hops_ms, tick.optimal_ms * (1 - 1e-9))
        << "minute " << tick.minute;
    EXPECT_GT(tick.optimal_ms, 0) << "minute " << tick.minute;
  }
  EXPECT_GT(routed, 10);
}

TEST_P(SimulatorTest, DeterministicPerSeed) {
  absl::StatusOr<SimulationResult> first =
      RunSimulation(SmallSwarm(5), GetParam());
  absl::StatusOr<SimulationResult> second =
      RunSimulation(SmallSwarm(5), GetParam());
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(FormatTicksCsv({*first}), FormatTicksCsv({*second}));

  absl::StatusOr<SimulationResult> other =
      RunSimulation(SmallSwarm(6), GetParam());
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_NE(FormatTicksCsv({*first}), FormatTicksCsv({*other}));
}

INSTANTIATE_TEST_SUITE_P(Policies, SimulatorTest,
                         ::testing::Values(PlacementPolicy::kPollen,
                                           PlacementPolicy::kPetals),
                         [](const auto& info) {
                           return PolicyName(info.param);
                         });

TEST(Simulator, PoliciesShareTheSwarm) {
  absl::StatusOr<SimulationResult> pollen =
      RunSimulation(SmallSwarm(), PlacementPolicy::kPollen);
  absl::StatusOr<SimulationResult> petals =
      RunSimulation(SmallSwarm(), PlacementPolicy::kPetals);
  ASSERT_TRUE(pollen.ok()) << pollen.status();
  ASSERT_TRUE(petals.ok()) << petals.status();
  EXPECT_EQ(pollen->summary.joins, petals->summary.joins);
  EXPECT_EQ(pollen->summary.leaves, petals->summary.leaves);
  ASSERT_EQ(pollen->ticks.size(), petals->ticks.size());
  for (size_t i = 0; i < pollen->ticks.size(); ++i) {
    EXPECT_EQ(pollen->ticks[i].nodes_present, petals->ticks[i].nodes_present)
        << "minute " << i;
    EXPECT_DOUBLE_EQ(pollen->ticks[i].upper_bound, petals->ticks[i].upper_bound)
        << "minute " << i;
  }
}

TEST(Simulator, ChurnReplacesNodes) {
  absl::StatusOr<SimulationResult> result =
      RunSimulation(SmallSwarm(), PlacementPolicy::kPollen);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_GT(result->summary.leaves, 0);
  EXPECT_GT(result->summary.joins, 30);
}

TEST(Simulator, RejectsInvalidOptions) {
  SimulationOptions options = SmallSwarm();
  options.nodes = 0;
  absl::StatusOr<SimulationResult> result =
      RunSimulation(options, PlacementPolicy::kPollen);
  ASSERT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(result.status().message(), "nodes"))
      << result.status();

  options = SmallSwarm();
  options.session_tokens = options.cache_tokens + 1;
  EXPECT_EQ(RunSimulation(options, PlacementPolicy::kPollen).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Simulator, KnowsModelsAndPolicies) {
  absl::StatusOr<SimulatedModel> model = FindSimulatedModel("llama3.1-405b");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->num_blocks, 126);
  EXPECT_EQ(FindSimulatedModel("gpt-5").status().code(),
            absl::StatusCode::kInvalidArgument);

  absl::StatusOr<PlacementPolicy> policy = ParsePolicy("Petals");
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_EQ(*policy, PlacementPolicy::kPetals);
  EXPECT_FALSE(ParsePolicy("random").ok());
}

TEST(SimulatorReport, CsvHasRowPerMinute) {
  absl::StatusOr<SimulationResult> result =
      RunSimulation(SmallSwarm(), PlacementPolicy::kPollen);
  ASSERT_TRUE(result.ok()) << result.status();
  const std::string csv = FormatTicksCsv({*result, *result});
  const std::vector<std::string> lines =
      absl::StrSplit(csv, '\n', absl::SkipEmpty());
  EXPECT_EQ(lines.size(), 1 + 2 * result->ticks.size());
  EXPECT_TRUE(absl::StartsWith(lines[0], "policy,minute,"));
}

TEST(SimulatorReport, SvgHasLinePerResult) {
  absl::StatusOr<SimulationResult> pollen =
      RunSimulation(SmallSwarm(), PlacementPolicy::kPollen);
  absl::StatusOr<SimulationResult> petals =
      RunSimulation(SmallSwarm(), PlacementPolicy::kPetals);
  ASSERT_TRUE(pollen.ok()) << pollen.status();
  ASSERT_TRUE(petals.ok()) << petals.status();
  const std::string svg = RenderBalanceSvg({*pollen, *petals}, "a < b & c");
  EXPECT_TRUE(absl::StartsWith(svg, "<svg "));
  EXPECT_TRUE(absl::StrContains(svg, "a &lt; b &amp; c"));
  std::vector<std::string> polylines = absl::StrSplit(svg, "<polyline");
  EXPECT_EQ(polylines.size(), 3u);
  EXPECT_TRUE(absl::StrContains(svg, "</svg>"));
}

}  // namespace
}  // namespace pollen::scheduler
