#include "scheduler/route.h"

#include <gtest/gtest.h>

namespace pollen::scheduler {
namespace {

ServerSpan Span(const std::string& id, int start, int end,
                int64_t cache = 1000, double throughput = 1) {
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

TEST(FewestHopsRoute, SingleNodeCoversAll) {
  auto route = FindFewestHopsRoute({Span("a", 0, 5)}, 0, 5);
  ASSERT_TRUE(route.ok()) << route.status();
  ASSERT_EQ(route->size(), 1u);
  EXPECT_EQ((*route)[0].start, 0);
  EXPECT_EQ((*route)[0].end, 5);
}

TEST(FewestHopsRoute, ChainsAdjacentSpans) {
  auto route = FindFewestHopsRoute(
      {Span("c", 4, 5), Span("a", 0, 2), Span("b", 2, 4)}, 0, 5);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ((*route)[1].start, 2);
  EXPECT_EQ((*route)[1].end, 4);
}

TEST(FewestHopsRoute, PrefersLongSpanOverManyShort) {
  auto route = FindFewestHopsRoute(
      {Span("a", 0, 1), Span("b", 1, 2), Span("c", 2, 3), Span("long", 0, 3)},
      0, 3);
  ASSERT_TRUE(route.ok());
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"long"}));
}

TEST(FewestHopsRoute, UsesSubRangeOfOverlappingSpans) {
  // a serves 0:3 and b serves 2:6; the route runs a on 0:3 and b on 3:6.
  auto route = FindFewestHopsRoute({Span("a", 0, 3), Span("b", 2, 6)}, 0, 6);
  ASSERT_TRUE(route.ok());
  ASSERT_EQ(route->size(), 2u);
  EXPECT_EQ((*route)[1].server.node_id, "b");
  EXPECT_EQ((*route)[1].start, 3);
  EXPECT_EQ((*route)[1].end, 6);
}

TEST(FewestHopsRoute, BreaksTiesByFreeCacheThenId) {
  auto by_cache = FindFewestHopsRoute(
      {Span("a", 0, 4, 100), Span("b", 0, 4, 900)}, 0, 4);
  ASSERT_TRUE(by_cache.ok());
  EXPECT_EQ(NodeIds(*by_cache), (std::vector<std::string>{"b"}));

  auto by_id = FindFewestHopsRoute({Span("z", 0, 4), Span("y", 0, 4)}, 0, 4);
  ASSERT_TRUE(by_id.ok());
  EXPECT_EQ(NodeIds(*by_id), (std::vector<std::string>{"y"}));
}

TEST(FewestHopsRoute, ReportsGapWithBlocks) {
  auto route = FindFewestHopsRoute(
      {Span("a", 0, 2), Span("b", 5, 8)}, 0, 8);
  ASSERT_FALSE(route.ok());
  EXPECT_EQ(route.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(route.status().message().find("blocks 2-4"), std::string::npos)
      << route.status();
}

TEST(FewestHopsRoute, SkipsExcludedNode) {
  RouteOptions options;
  options.excluded_nodes = {"dead"};
  auto route = FindFewestHopsRoute(
      {Span("dead", 0, 4), Span("a", 0, 2), Span("b", 2, 4)}, 0, 4, options);
  ASSERT_TRUE(route.ok());
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"a", "b"}));

  options.excluded_nodes = {"dead", "a"};
  auto gap = FindFewestHopsRoute(
      {Span("dead", 0, 4), Span("a", 0, 2), Span("b", 2, 4)}, 0, 4, options);
  ASSERT_FALSE(gap.ok());
  EXPECT_NE(gap.status().message().find("blocks 0-1"), std::string::npos);
}

TEST(FewestHopsRoute, SkipsNodesLowOnCache) {
  RouteOptions options;
  options.min_cache_tokens = 500;
  auto route = FindFewestHopsRoute(
      {Span("full", 0, 4, 10), Span("free", 0, 4, 600)}, 0, 4, options);
  ASSERT_TRUE(route.ok());
  EXPECT_EQ(NodeIds(*route), (std::vector<std::string>{"free"}));
}

TEST(FewestHopsRoute, RoutesInsideLargerRange) {
  auto route = FindFewestHopsRoute({Span("a", 0, 10)}, 3, 5);
  ASSERT_TRUE(route.ok());
  EXPECT_EQ((*route)[0].start, 3);
  EXPECT_EQ((*route)[0].end, 5);
}

TEST(FewestHopsRoute, RejectsEmptyRange) {
  auto route = FindFewestHopsRoute({Span("a", 0, 10)}, 4, 4);
  EXPECT_EQ(route.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FormatBlockList, MergesRuns) {
  EXPECT_EQ(FormatBlockList({1, 2, 3, 7, 9, 10}), "1-3, 7, 9-10");
  EXPECT_EQ(FormatBlockList({}), "");
}

}  // namespace
}  // namespace pollen::scheduler
