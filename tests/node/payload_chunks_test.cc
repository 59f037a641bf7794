// PayloadChunk splitting and reassembly, and the training compute queue.
#include "common/payload_chunks.h"

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/synchronization/notification.h"
#include "node/compute_queue.h"

namespace pollen {
namespace {

TEST(PayloadChunks, SplitsAndJoins) {
  std::string payload(10'000, 'x');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 31);
  const std::vector<v1::PayloadChunk> chunks = SplitIntoChunks(payload, 4096);
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[0].data().size(), 4096u);
  EXPECT_FALSE(chunks[1].last());
  EXPECT_TRUE(chunks[2].last());

  Reassembler reassembler(20'000);
  for (const v1::PayloadChunk& chunk : chunks) {
    ASSERT_TRUE(reassembler.Add(chunk).ok());
  }
  EXPECT_TRUE(reassembler.complete());
  auto joined = reassembler.Take();
  ASSERT_TRUE(joined.ok()) << joined.status();
  EXPECT_EQ(*joined, payload);
}

TEST(PayloadChunks, EmptyIsOneLastChunk) {
  const std::vector<v1::PayloadChunk> chunks = SplitIntoChunks("");
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_TRUE(chunks[0].last());
}

TEST(PayloadChunks, ExactMultiple) {
  const std::vector<v1::PayloadChunk> chunks =
      SplitIntoChunks(std::string(8, 'a'), 4);
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_TRUE(chunks[1].last());
}

TEST(PayloadChunks, RejectsOverLimit) {
  Reassembler reassembler(10);
  v1::PayloadChunk chunk;
  chunk.set_data(std::string(6, 'a'));
  ASSERT_TRUE(reassembler.Add(chunk).ok());
  const absl::Status status = reassembler.Add(chunk);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(status.message().find("12 bytes exceeds the limit of 10"),
            absl::string_view::npos)
      << status;
}

TEST(PayloadChunks, RejectsMissingLast) {
  Reassembler reassembler;
  v1::PayloadChunk chunk;
  chunk.set_data("abc");
  ASSERT_TRUE(reassembler.Add(chunk).ok());
  EXPECT_EQ(reassembler.Take().status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PayloadChunks, RejectsChunkAfterLast) {
  Reassembler reassembler;
  v1::PayloadChunk chunk;
  chunk.set_last(true);
  ASSERT_TRUE(reassembler.Add(chunk).ok());
  EXPECT_EQ(reassembler.Add(chunk).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ComputeQueue, WaitsForInference) {
  node::ComputeQueue queue;
  std::atomic<bool> ran{false};
  absl::Notification done;
  {
    node::ComputeQueue::InferenceScope step(&queue);
    ASSERT_TRUE(queue
                    .Submit([&](bool cancelled) {
                      ran = !cancelled;
                      done.Notify();
                    })
                    .ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_FALSE(ran.load());
  }
  EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(ran.load());
}

TEST(ComputeQueue, RunsInOrderOneAtATime) {
  node::ComputeQueue queue;
  std::vector<int> order;
  std::atomic<int> running{0};
  std::atomic<int> most{0};
  absl::Notification done;
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(queue
                    .Submit([&, i](bool) {
                      most = std::max(most.load(), ++running);
                      std::this_thread::sleep_for(std::chrono::milliseconds(5));
                      order.push_back(i);
                      --running;
                      if (i == 3) done.Notify();
                    })
                    .ok());
  }
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(most.load(), 1);
}

TEST(ComputeQueue, RejectsWhenFull) {
  node::ComputeQueue queue(/*max_queued=*/1);
  absl::Notification release;
  node::ComputeQueue::InferenceScope step(&queue);  // holds every job back
  ASSERT_TRUE(queue.Submit([](bool) {}).ok());
  EXPECT_EQ(queue.Submit([](bool) {}).code(),
            absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace pollen
