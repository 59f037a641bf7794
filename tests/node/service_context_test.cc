// ServedSpans, the loopback check of MoveBlocks, and sessions on several
// spans: the pieces of a live move that need no process.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/checkpoint.h"
#include "node/block_service.h"
#include "node/block_span.h"
#include "node/session_manager.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

using ::pollen::testing::Stories260kDir;

std::shared_ptr<const BlockSpan> LoadStories(int start, int end) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  if (!checkpoint.ok()) return nullptr;
  auto span = BlockSpan::Load(**checkpoint, start, end, at::kFloat, at::kCPU);
  EXPECT_TRUE(span.ok()) << span.status();
  if (!span.ok()) return nullptr;
  return std::shared_ptr<const BlockSpan>(std::move(*span));
}

TEST(IsLoopbackPeer, AcceptsLocalAddresses) {
  for (const char* peer :
       {"ipv4:127.0.0.1:5000", "ipv4:127.8.9.10:1", "ipv6:[::1]:5000",
        "ipv6:%5B::1%5D:5000", "ipv6:%5B%3A%3A1%5D:5000",
        "ipv6:[::ffff:127.0.0.1]:80", "unix:/tmp/pollen.sock"}) {
    EXPECT_TRUE(IsLoopbackPeer(peer)) << peer;
  }
}

TEST(IsLoopbackPeer, RejectsOtherAddresses) {
  for (const char* peer :
       {"ipv4:10.0.0.1:5000", "ipv4:128.0.0.1:5000", "ipv6:[2001:db8::1]:5000",
        "ipv6:[::ffff:10.0.0.1]:80", "ipv4:localhost:5000", "", "127.0.0.1",
        "ipv4:", "ipv6:[::1"}) {
    EXPECT_FALSE(IsLoopbackPeer(peer)) << peer;
  }
}

TEST(ServedSpans, PrefersCurrentThenPrevious) {
  const auto old_span = LoadStories(0, 2);
  const auto new_span = LoadStories(2, 5);
  ASSERT_NE(old_span, nullptr);
  ASSERT_NE(new_span, nullptr);
  ServedSpans spans;
  spans.Set(new_span, old_span);

  auto on_new = spans.SpanFor(2, 4);
  ASSERT_TRUE(on_new.ok()) << on_new.status();
  EXPECT_EQ(on_new->get(), new_span.get());
  auto on_old = spans.SpanFor(0, 1);
  ASSERT_TRUE(on_old.ok()) << on_old.status();
  EXPECT_EQ(on_old->get(), old_span.get());
  // Neither span covers both halves.
  EXPECT_EQ(spans.SpanFor(1, 3).status().code(), absl::StatusCode::kUnavailable);

  spans.Set(new_span);
  EXPECT_EQ(spans.current().get(), new_span.get());
  const absl::Status dropped = spans.SpanFor(0, 1).status();
  EXPECT_EQ(dropped.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(dropped.message().find("serves 2:5"), absl::string_view::npos)
      << dropped;
}

TEST(ServedSpans, RejectsRangesOutsideModel) {
  ServedSpans spans;
  spans.Set(LoadStories(0, 5));
  EXPECT_EQ(spans.SpanFor(3, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(spans.SpanFor(4, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(spans.SpanFor(3, 9).status().code(),
            absl::StatusCode::kInvalidArgument);
}

SessionRequest Request(const std::string& id, int from, int to) {
  SessionRequest request;
  request.session_id = id;
  request.from = from;
  request.to = to;
  request.max_length = 8;
  return request;
}

TEST(SessionManager, DrainsAndClosesSessionsOfOneSpan) {
  std::shared_ptr<const BlockSpan> old_span = LoadStories(0, 2);
  const auto new_span = LoadStories(2, 5);
  ASSERT_NE(old_span, nullptr);
  ASSERT_NE(new_span, nullptr);
  SessionLimits limits;
  limits.cache_token_budget = 100;
  SessionManager sessions(limits);

  auto on_old = sessions.Open(Request("old", 0, 2), old_span);
  ASSERT_TRUE(on_old.ok()) << on_old.status();
  auto on_new = sessions.Open(Request("new", 2, 5), new_span);
  ASSERT_TRUE(on_new.ok()) << on_new.status();
  EXPECT_EQ(sessions.CountSessionsOn(old_span.get()), 1);

  EXPECT_EQ(sessions.MarkDraining(old_span.get()), 1);
  EXPECT_TRUE((*on_old)->draining.load());
  EXPECT_FALSE((*on_new)->draining.load());

  // Closing the old span's sessions releases the last reference to it.
  std::weak_ptr<const BlockSpan> watch = old_span;
  const BlockSpan* key = old_span.get();
  old_span.reset();
  EXPECT_FALSE(watch.expired());
  EXPECT_EQ(sessions.CloseSessionsOn(key, "moved"), 1);
  EXPECT_TRUE(watch.expired());
  EXPECT_EQ(sessions.open_sessions(), 1);
  EXPECT_EQ(sessions.cache_tokens_left(), 100 - 8);

  EXPECT_EQ(sessions.MarkDraining(nullptr), 1);
  EXPECT_TRUE((*on_new)->draining.load());
}

}  // namespace
}  // namespace pollen::node
