#include "scheduler/latency_route.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <map>
#include <random>

#include "absl/strings/str_cat.h"

namespace pollen::scheduler {
namespace {

ServerSpan Span(const std::string& id, int start, int end,
                double throughput = 1000, int64_t cache = 1000) {
  ServerSpan span;
  span.node_id = id;
  span.address = id + ":1";
  span.start = start;
  span.end = end;
  span.throughput = throughput;
  span.cache_tokens_left = cache;
  return span;
}

std::vector<std::string> NodeIds(const std::vector<RouteHop>& route) {
  std::vector<std::string> ids;
  for (const RouteHop& hop : route) ids.push_back(hop.server.node_id);
  return ids;
}

// Checks that `route` runs blocks [start, end) in order, each hop inside its
// server's span.
void ExpectCovers(const std::vector<RouteHop>& route, int start, int end) {
  int next = start;
  for (const RouteHop& hop : route) {
    EXPECT_EQ(hop.start, next);
    EXPECT_LT(hop.start, hop.end);
    EXPECT_LE(hop.server.start, hop.start);
    EXPECT_GE(hop.server.end, hop.end);
    next = hop.end;
  }
  EXPECT_EQ(next, end);
}

// The least RouteLatencyMs over every sequence of hops, found by trying them
// all. Usable spans follow the same rules as FindFastestRoute.
double BruteForceLatency(const std::vector<ServerSpan>& spans, int start,
                         int end, const LatencyModel& model,
                         std::vector<RouteHop>& prefix) {
  if (start == end) return RouteLatencyMs(prefix, model);
  double best = std::numeric_limits<double>::infinity();
  for (const ServerSpan& span : spans) {
    if (span.start > start || span.end <= start) continue;
    if (span.cache_tokens_left < model.tokens_needed) continue;
    for (int hop_end = start + 1; hop_end <= std::min(span.end, end);
         ++hop_end) {
      prefix.push_back(RouteHop{span, start, hop_end});
      best =
          std::min(best, BruteForceLatency(spans, hop_end, end, model, prefix));
      prefix.pop_back();
    }
  }
  return best;
}

TEST(RouteLatency, FollowsDocumentedFormula) {
  ServerSpan a = Span("a", 0, 2, 100);
  ServerSpan b = Span("b", 2, 5, 50);
  a.next_rtt_ms["b"] = 8;
  LatencyModel model;
  model.client_rtt_ms = {{"a", 20}, {"b", 40}};

  // a: 20/2 forward + 20/2 return + 2 blocks * 10 ms.
  // b: 8/2 forward from a + 40/2 return + 3 blocks * 20 ms.
  const double expected = (10 + 10 + 20) + (4 + 20 + 60);
  EXPECT_DOUBLE_EQ(RouteLatencyMs({{a, 0, 2}, {b, 2, 5}}, model), expected);
}

TEST(RouteLatency, DefaultsAndPenalty) {
  ServerSpan a = Span("a", 0, 1, 0, 3);  // unknown throughput, low cache
  LatencyModel model;
  model.default_rtt_ms = 30;
  model.default_throughput = 4;
  model.tokens_needed = 2;
  model.low_cache_penalty_ms = 500;
  EXPECT_DOUBLE_EQ(RouteLatencyMs({{a, 0, 1}}, model), 30 + 250 + 500);
}

TEST(FastestRoute, SingleNodeCoversAll) {
  LatencyModel model;
  auto route = FindFastestRoute({Span("a", 0, 5)}, 0, 5, model);
  ASSERT_TRUE(route.ok()) << route.status();
  ASSERT_EQ(route->size(), 1u);
  EXPECT_EQ((*route)[0].start, 0);
  EXPECT_EQ((*route)[0].end, 5);
}

TEST(FastestRoute, PrefersNearNodesOverFewerHops) {
  LatencyModel model;
  model.client_rtt_ms = {{"far", 300}, {"near1", 10}, {"near2", 10}};
  auto route = FindFastestRoute(
      {Span("far", 0, 4), Span("near1", 0, 2), Span("near2", 2, 4)}, 0, 4,
      model);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"near1", "near2"}));
}

TEST(FastestRoute, PrefersFewerHopsWhenRttsEqual) {
  LatencyModel model;
  auto route = FindFastestRoute(
      {Span("a", 0, 2), Span("b", 2, 4), Span("long", 0, 4)}, 0, 4, model);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"long"}));
}

TEST(FastestRoute, EndsHopEarlyForFasterNode) {
  // "slow" serves 0:4 at 10 steps/s; "fast" serves 2:4 at 1000 steps/s.
  LatencyModel model;
  model.client_rtt_ms = {{"slow", 10}, {"fast", 10}};
  auto route = FindFastestRoute(
      {Span("slow", 0, 4, 10), Span("fast", 2, 4, 1000)}, 0, 4, model);
  ASSERT_TRUE(route.ok()) << route.status();
  ASSERT_EQ(route->size(), 2u);
  EXPECT_EQ((*route)[0].server.node_id, "slow");
  EXPECT_EQ((*route)[0].end, 2);
  EXPECT_EQ((*route)[1].server.node_id, "fast");
  EXPECT_EQ((*route)[1].start, 2);
}

TEST(FastestRoute, UsesAnnouncedNextRtt) {
  ServerSpan a = Span("a", 0, 2);
  a.next_rtt_ms["b"] = 2;
  LatencyModel model;
  model.client_rtt_ms = {{"a", 10}, {"b", 100}, {"c", 90}};
  auto route =
      FindFastestRoute({a, Span("b", 2, 4), Span("c", 2, 4)}, 0, 4, model);
  ASSERT_TRUE(route.ok()) << route.status();
  // After a, b costs 2/2 + 100/2 = 51 ms and c costs 90/2 + 90/2 = 90 ms.
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"a", "b"}));
}

TEST(FastestRoute, AnnouncedRttCanBeWorse) {
  // a announces a slow link to b, so c, with no announcement, wins although
  // the client is closer to b.
  ServerSpan a = Span("a", 0, 2);
  a.next_rtt_ms["b"] = 400;
  LatencyModel model;
  model.client_rtt_ms = {{"a", 10}, {"b", 20}, {"c", 40}};
  auto route =
      FindFastestRoute({a, Span("b", 2, 4), Span("c", 2, 4)}, 0, 4, model);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"a", "c"}));
}

TEST(FastestRoute, AvoidsLowCacheNode) {
  LatencyModel model;
  model.tokens_needed = 100;
  model.client_rtt_ms = {{"full", 10}, {"free", 50}};
  auto route = FindFastestRoute(
      {Span("full", 0, 3, 1000, 150), Span("free", 0, 3, 1000, 1000)}, 0, 3,
      model);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"free"}));
}

TEST(FastestRoute, FullNodesAreResourceExhausted) {
  LatencyModel model;
  model.tokens_needed = 100;
  auto route = FindFastestRoute(
      {Span("full", 0, 3, 1000, 99), Span("fuller", 0, 3, 1000, 20)}, 0, 3,
      model);
  ASSERT_EQ(route.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(route.status().message().find("blocks 0-2"), std::string::npos)
      << route.status();
  EXPECT_NE(route.status().message().find("needs 100 cache tokens"),
            std::string::npos)
      << route.status();
  EXPECT_NE(route.status().message().find("has 99 left"), std::string::npos)
      << route.status();
}

TEST(FastestRoute, MissingNodeOutweighsFullNode) {
  // Block 3 has no node at all, so more nodes, not free cache, would help.
  LatencyModel model;
  model.tokens_needed = 100;
  auto route = FindFastestRoute({Span("full", 0, 3, 1000, 99)}, 0, 4, model);
  ASSERT_EQ(route.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(route.status().message().find("3"), std::string::npos)
      << route.status();

  // An excluded node does not count as a full one.
  RouteOptions options;
  options.excluded_nodes = {"full"};
  route = FindFastestRoute({Span("full", 0, 3, 1000, 99)}, 0, 3, model, options);
  EXPECT_EQ(route.status().code(), absl::StatusCode::kNotFound);
}

TEST(FastestRoute, RespectsExcludedNodes) {
  LatencyModel model;
  model.client_rtt_ms = {{"a", 1}, {"b", 100}};
  RouteOptions options;
  options.excluded_nodes = {"a"};
  auto route = FindFastestRoute({Span("a", 0, 3), Span("b", 0, 3)}, 0, 3, model,
                                options);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"b"}));
}

TEST(FastestRoute, NotFoundNamesUnservedBlocks) {
  LatencyModel model;
  auto route =
      FindFastestRoute({Span("a", 0, 3), Span("b", 5, 8)}, 0, 8, model);
  ASSERT_EQ(route.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(route.status().message().find("3-4"), std::string::npos)
      << route.status();
}

TEST(FastestRoute, RejectsEmptyRange) {
  LatencyModel model;
  auto route = FindFastestRoute({Span("a", 0, 3)}, 2, 2, model);
  EXPECT_EQ(route.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FastestRoute, RejectsNonPositiveDefaultThroughput) {
  LatencyModel model;
  model.default_throughput = 0;
  auto route = FindFastestRoute({Span("a", 0, 3)}, 0, 3, model);
  EXPECT_EQ(route.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FastestRoute, RejectsInvalidDefaultRtt) {
  LatencyModel model;
  model.default_rtt_ms = std::numeric_limits<double>::quiet_NaN();
  auto route = FindFastestRoute({Span("a", 0, 3)}, 0, 3, model);
  EXPECT_EQ(route.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FastestRoute, InvalidRttsCountAsUnknown) {
  // A NaN client RTT falls back to default_rtt_ms and a negative announced
  // RTT is ignored, in the search and in RouteLatencyMs alike.
  ServerSpan a = Span("a", 0, 2);
  a.next_rtt_ms["b"] = -5;
  LatencyModel model;
  model.default_rtt_ms = 40;
  model.client_rtt_ms = {{"a", std::numeric_limits<double>::quiet_NaN()},
                         {"b", 10},
                         {"c", std::numeric_limits<double>::infinity()}};
  const std::vector<ServerSpan> spans = {a, Span("b", 2, 4), Span("c", 2, 4)};
  auto route = FindFastestRoute(spans, 0, 4, model);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"a", "b"}));
  // a: 40 + 2 ms compute, b: 10 + 2 ms compute.
  EXPECT_DOUBLE_EQ(RouteLatencyMs(*route, model), 54);
}

TEST(FastestRoute, RoutesSubRange) {
  LatencyModel model;
  auto route =
      FindFastestRoute({Span("a", 0, 4), Span("b", 4, 8)}, 2, 6, model);
  ASSERT_TRUE(route.ok()) << route.status();
  ExpectCovers(*route, 2, 6);
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"a", "b"}));
}

TEST(FastestRoute, MatchesBruteForce) {
  std::mt19937_64 rng(7);
  const auto uniform = [&rng](double low, double high) {
    return std::uniform_real_distribution<double>(low, high)(rng);
  };
  for (int trial = 0; trial < 200; ++trial) {
    const int num_blocks = 3 + trial % 4;
    const int num_spans = 2 + trial % 5;
    std::vector<ServerSpan> spans;
    LatencyModel model;
    model.tokens_needed = 10;
    model.low_cache_penalty_ms = 80;
    for (int i = 0; i < num_spans; ++i) {
      const int start = static_cast<int>(uniform(0, num_blocks));
      const int end =
          std::min(num_blocks, start + 1 + static_cast<int>(uniform(0, 3)));
      ServerSpan span = Span(absl::StrCat("n", i), start, end,
                             uniform(0, 1) < 0.2 ? 0 : uniform(5, 200),
                             static_cast<int64_t>(uniform(5, 40)));
      if (uniform(0, 1) < 0.8)
        model.client_rtt_ms[span.node_id] = uniform(1, 150);
      spans.push_back(span);
    }
    for (ServerSpan& span : spans) {
      for (int j = 0; j < num_spans; ++j) {
        if (uniform(0, 1) < 0.4) {
          span.next_rtt_ms[absl::StrCat("n", j)] = uniform(1, 300);
        }
      }
    }

    std::vector<RouteHop> prefix;
    const double brute = BruteForceLatency(spans, 0, num_blocks, model, prefix);
    auto route = FindFastestRoute(spans, 0, num_blocks, model);
    if (brute == std::numeric_limits<double>::infinity()) {
      EXPECT_TRUE(absl::IsNotFound(route.status()) ||
                  absl::IsResourceExhausted(route.status()))
          << "trial " << trial << ": " << route.status();
      continue;
    }
    ASSERT_TRUE(route.ok()) << "trial " << trial << ": " << route.status();
    ExpectCovers(*route, 0, num_blocks);
    EXPECT_NEAR(RouteLatencyMs(*route, model), brute, 1e-9 * brute)
        << "trial " << trial;
  }
}

TEST(FastestRoute, LargeSwarmBeatsFewestHops) {
  // 1,000 nodes over 126 blocks, each announcing 8 next nodes.
  constexpr int kBlocks = 126;
  std::mt19937_64 rng(3);
  std::vector<ServerSpan> spans;
  LatencyModel model;
  for (int i = 0; i < 1000; ++i) {
    const int length = 3 + static_cast<int>(rng() % 10);
    const int start = static_cast<int>(rng() % (kBlocks - length + 1));
    ServerSpan span = Span(absl::StrCat("node", i), start, start + length,
                           20 + static_cast<double>(rng() % 200));
    model.client_rtt_ms[span.node_id] = 1 + static_cast<double>(rng() % 150);
    spans.push_back(span);
  }
  for (ServerSpan& span : spans) {
    for (int k = 0; k < 8; ++k) {
      span.next_rtt_ms[absl::StrCat("node", rng() % 1000)] =
          1 + static_cast<double>(rng() % 150);
    }
  }

  auto fastest = FindFastestRoute(spans, 0, kBlocks, model);
  ASSERT_TRUE(fastest.ok()) << fastest.status();
  ExpectCovers(*fastest, 0, kBlocks);

  auto fewest = FindFewestHopsRoute(spans, 0, kBlocks);
  ASSERT_TRUE(fewest.ok()) << fewest.status();
  EXPECT_LE(RouteLatencyMs(*fastest, model), RouteLatencyMs(*fewest, model));
}

TEST(SampledRoute, SameSeedSameRoute) {
  const std::vector<ServerSpan> spans = {Span("a", 0, 3, 5), Span("b", 0, 6, 3),
                                         Span("c", 3, 6, 2),
                                         Span("d", 2, 6, 7)};
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::mt19937_64 first(seed);
    std::mt19937_64 second(seed);
    auto a = SampleThroughputRoute(spans, 0, 6, {}, first);
    auto b = SampleThroughputRoute(spans, 0, 6, {}, second);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(NodeIds(*a), NodeIds(*b)) << "seed " << seed;
    ExpectCovers(*a, 0, 6);
  }
}

TEST(SampledRoute, ProportionalToThroughput) {
  const std::vector<ServerSpan> spans = {Span("a", 0, 4, 3),
                                         Span("b", 0, 4, 1)};
  std::mt19937_64 rng(1);
  constexpr int kDraws = 20000;
  int chose_a = 0;
  for (int i = 0; i < kDraws; ++i) {
    auto route = SampleThroughputRoute(spans, 0, 4, {}, rng);
    ASSERT_TRUE(route.ok()) << route.status();
    ASSERT_EQ(route->size(), 1u);
    if ((*route)[0].server.node_id == "a") ++chose_a;
  }
  EXPECT_NEAR(static_cast<double>(chose_a) / kDraws, 0.75, 0.02);
}

TEST(SampledRoute, QueuedRequestsLowerWeight) {
  // a: 3 / (1 + 2) = 1, b: 1 / (1 + 0) = 1.
  const std::vector<ServerSpan> spans = {Span("a", 0, 4, 3),
                                         Span("b", 0, 4, 1)};
  const std::map<std::string, int> queued = {{"a", 2}};
  std::mt19937_64 rng(2);
  constexpr int kDraws = 20000;
  int chose_a = 0;
  for (int i = 0; i < kDraws; ++i) {
    auto route = SampleThroughputRoute(spans, 0, 4, queued, rng);
    ASSERT_TRUE(route.ok()) << route.status();
    if ((*route)[0].server.node_id == "a") ++chose_a;
  }
  EXPECT_NEAR(static_cast<double>(chose_a) / kDraws, 0.5, 0.02);
}

TEST(SampledRoute, UnknownThroughputCountsAsWeakest) {
  // "unknown" weighs as much as "slow", 1 of 1 + 1 + 2.
  const std::vector<ServerSpan> spans = {
      Span("unknown", 0, 2, 0), Span("slow", 0, 2, 1), Span("fast", 0, 2, 2)};
  std::mt19937_64 rng(3);
  constexpr int kDraws = 20000;
  int chose_unknown = 0;
  for (int i = 0; i < kDraws; ++i) {
    auto route = SampleThroughputRoute(spans, 0, 2, {}, rng);
    ASSERT_TRUE(route.ok()) << route.status();
    if ((*route)[0].server.node_id == "unknown") ++chose_unknown;
  }
  EXPECT_NEAR(static_cast<double>(chose_unknown) / kDraws, 0.25, 0.02);
}

TEST(SampledRoute, HopRunsToSpanEnd) {
  std::mt19937_64 rng(4);
  auto route =
      SampleThroughputRoute({Span("a", 0, 5), Span("b", 5, 9)}, 1, 7, {}, rng);
  ASSERT_TRUE(route.ok()) << route.status();
  ASSERT_EQ(route->size(), 2u);
  EXPECT_EQ((*route)[0].start, 1);
  EXPECT_EQ((*route)[0].end, 5);
  EXPECT_EQ((*route)[1].end, 7);
}

TEST(SampledRoute, RespectsExcludedNodes) {
  RouteOptions options;
  options.excluded_nodes = {"a"};
  std::mt19937_64 rng(5);
  for (int i = 0; i < 50; ++i) {
    auto route = SampleThroughputRoute(
        {Span("a", 0, 4, 100), Span("b", 0, 4, 1)}, 0, 4, {}, rng, options);
    ASSERT_TRUE(route.ok()) << route.status();
    EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"b"}));
  }
}

TEST(SampledRoute, NotFoundNamesUnservedBlocks) {
  std::mt19937_64 rng(6);
  auto route = SampleThroughputRoute({Span("a", 0, 2)}, 0, 4, {}, rng);
  ASSERT_EQ(route.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(route.status().message().find("2-3"), std::string::npos)
      << route.status();
}

}  // namespace
}  // namespace pollen::scheduler
