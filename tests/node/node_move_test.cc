// Live moves and shutdown of a real `pollen node` process, driven with raw
// gRPC: open sessions keep working with `draining` set in their responses,
// and new sessions go where the node now serves.
#include <signal.h>
#include <sys/wait.h>

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <fstream>
#include <optional>
#include <sstream>

#include "common/tensor_codec.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr int kHidden = 64;  // stories260k

using Stream =
    grpc::ClientReaderWriter<v1::InferenceRequest, v1::InferenceResponse>;

// A raw Inference stream on one node.
class RawSession {
 public:
  RawSession(v1::BlockService::Stub& stub, const std::string& model_id,
             const std::string& session_id, int start, int end)
      : model_id_(model_id), session_id_(session_id), start_(start), end_(end) {
    context_.set_deadline(std::chrono::system_clock::now() +
                          std::chrono::seconds(60));
    stream_ = stub.Inference(&context_);
  }

  // Sends `open` and reads its reply; false when the stream failed.
  bool Open(v1::InferenceResponse* response) {
    v1::InferenceRequest request;
    request.mutable_open()->set_model_id(model_id_);
    request.mutable_open()->mutable_blocks()->set_start(start_);
    request.mutable_open()->mutable_blocks()->set_end(end_);
    request.mutable_open()->set_max_length(32);
    request.mutable_open()->set_session_id(session_id_);
    return stream_->Write(request) && stream_->Read(response);
  }

  // Sends one token at the next position and reads the reply.
  bool Step(v1::InferenceResponse* response) {
    v1::InferenceRequest request;
    EXPECT_TRUE(TensorToProto(at::randn({1, 1, kHidden}),
                              request.mutable_step()->mutable_hidden_states())
                    .ok());
    request.mutable_step()->set_position(position_);
    if (!stream_->Write(request) || !stream_->Read(response)) return false;
    position_ = static_cast<int>(response->position());
    return true;
  }

  grpc::Status Close() {
    stream_->WritesDone();
    return stream_->Finish();
  }

 private:
  const std::string model_id_;
  const std::string session_id_;
  const int start_;
  const int end_;
  int position_ = 0;
  grpc::ClientContext context_;
  std::unique_ptr<Stream> stream_;
};

std::unique_ptr<v1::BlockService::Stub> StubFor(const std::string& address) {
  return v1::BlockService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

grpc::Status MoveBlocks(v1::BlockService::Stub& stub, int start, int end,
                        v1::MoveBlocksResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(30));
  v1::MoveBlocksRequest request;
  request.mutable_blocks()->set_start(start);
  request.mutable_blocks()->set_end(end);
  return stub.MoveBlocks(&context, request, response);
}

// The record of the node named `name` under `block`, if any.
std::optional<v1::NodeRecord> RecordOf(LocalSwarm& swarm,
                                       const std::string& model_id, int block,
                                       const std::string& name) {
  auto records = swarm.registry().FetchBlock(model_id, block, absl::Seconds(3));
  if (!records.ok()) return std::nullopt;
  for (const v1::NodeRecord& record : *records) {
    if (record.public_name() == name) return record;
  }
  return std::nullopt;
}


TEST(NodeMove, MoveBlocksKeepsOldSessionsDraining) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(
      Stories260kDir(), "move", 0, 2,
      {"--throughput", "1", "--rebalance-period-s", "0", "--drain-timeout-s",
       "60"});
  ASSERT_TRUE(index.ok()) << index.status();
  NodeHandle& node = swarm.node(*index);
  auto stub = StubFor(node.address);

  // A session on the old span, one step in.
  RawSession old_session(*stub, "move", "before-move", 0, 2);
  v1::InferenceResponse response;
  ASSERT_TRUE(old_session.Open(&response));
  ASSERT_TRUE(old_session.Step(&response));
  EXPECT_FALSE(response.draining());

  // Move.
  v1::MoveBlocksResponse moved;
  const grpc::Status move_status = MoveBlocks(*stub, 2, 5, &moved);
  ASSERT_TRUE(move_status.ok()) << move_status.error_message();
  EXPECT_EQ(moved.blocks().start(), 2u);
  EXPECT_EQ(moved.blocks().end(), 5u);

  // The old session goes on, marked draining.
  for (int step = 0; step < 3; ++step) {
    ASSERT_TRUE(old_session.Step(&response)) << "step " << step;
    EXPECT_TRUE(response.draining()) << "step " << step;
    EXPECT_EQ(response.position(), static_cast<uint32_t>(step + 2));
  }

  // New sessions open on the new span only.
  RawSession stale(*stub, "move", "stale-records", 0, 2);
  EXPECT_FALSE(stale.Open(&response));
  const grpc::Status stale_status = stale.Close();
  EXPECT_EQ(stale_status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << stale_status.error_message();
  RawSession fresh(*stub, "move", "after-move", 2, 5);
  ASSERT_TRUE(fresh.Open(&response));
  ASSERT_TRUE(fresh.Step(&response));
  EXPECT_FALSE(response.draining());
  EXPECT_TRUE(fresh.Close().ok());

  // Records: the new span is ONLINE, the old blocks carry no ONLINE record.
  EXPECT_TRUE(Eventually(
      [&] {
        auto record = RecordOf(swarm, "move", 3, node.name);
        return record.has_value() && record->state() == v1::NODE_STATE_ONLINE &&
               record->blocks().start() == 2 && record->blocks().end() == 5;
      },
      absl::Seconds(10)));
  for (int block : {0, 1}) {
    auto record = RecordOf(swarm, "move", block, node.name);
    EXPECT_TRUE(!record.has_value() ||
                record->state() != v1::NODE_STATE_ONLINE)
        << "block " << block << ": " << record->DebugString();
  }

  // Closing the last old session frees the old span.
  EXPECT_TRUE(old_session.Close().ok());
  EXPECT_TRUE(Eventually(
      [&] {
        return ReadFile(node.process.log_path()).find("freed blocks 0:2") !=
               std::string::npos;
      },
      absl::Seconds(10)))
      << node.process.LogTail();
}

TEST(NodeMove, DrainTimeoutClosesOldSessions) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(
      Stories260kDir(), "move-timeout", 0, 3,
      {"--throughput", "1", "--rebalance-period-s", "0", "--drain-timeout-s",
       "2"});
  ASSERT_TRUE(index.ok()) << index.status();
  auto stub = StubFor(swarm.node(*index).address);

  RawSession session(*stub, "move-timeout", "lingering", 0, 3);
  v1::InferenceResponse response;
  ASSERT_TRUE(session.Open(&response));
  v1::MoveBlocksResponse moved;
  ASSERT_TRUE(MoveBlocks(*stub, 1, 4, &moved).ok());

  // The node checks draining spans once a second.
  absl::SleepFor(absl::Seconds(4));
  EXPECT_FALSE(session.Step(&response));
  const grpc::Status status = session.Close();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND)
      << status.error_message();
  EXPECT_NE(status.error_message().find("drain timeout"), std::string::npos)
      << status.error_message();
}

TEST(NodeMove, MoveBlocksRejectsBadRanges) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), "move-bad", 0, 2,
                               {"--throughput", "1"});
  ASSERT_TRUE(index.ok()) << index.status();
  auto stub = StubFor(swarm.node(*index).address);

  v1::MoveBlocksResponse moved;
  for (const auto& [start, end] :
       std::vector<std::pair<int, int>>{{3, 9}, {2, 2}, {4, 1}}) {
    const grpc::Status status = MoveBlocks(*stub, start, end, &moved);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << start << ":" << end << " " << status.error_message();
  }

  // A move to the current span is a no-op that succeeds.
  const grpc::Status same = MoveBlocks(*stub, 0, 2, &moved);
  ASSERT_TRUE(same.ok()) << same.error_message();
  EXPECT_EQ(moved.blocks().end(), 2u);
}

TEST(NodeShutdown, SigtermDrainsOpenSession) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), "drain", 0, 5,
                               {"--throughput", "1", "--drain-timeout-s", "30"});
  ASSERT_TRUE(index.ok()) << index.status();
  NodeHandle& node = swarm.node(*index);
  auto stub = StubFor(node.address);

  RawSession session(*stub, "drain", "open-at-sigterm", 0, 5);
  v1::InferenceResponse response;
  ASSERT_TRUE(session.Open(&response));
  ASSERT_TRUE(session.Step(&response));
  EXPECT_FALSE(response.draining());

  node.process.Signal(SIGTERM);
  absl::SleepFor(absl::Milliseconds(500));

  // The open session keeps working, marked draining. New ones are rejected.
  for (int step = 0; step < 3; ++step) {
    ASSERT_TRUE(session.Step(&response)) << "step " << step;
    EXPECT_TRUE(response.draining()) << "step " << step;
  }
  RawSession late(*stub, "drain", "after-sigterm", 0, 5);
  EXPECT_FALSE(late.Open(&response));
  EXPECT_EQ(late.Close().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(node.process.IsRunning());

  // Closing the session lets the node exit well within the drain timeout.
  const absl::Time closed = absl::Now();
  EXPECT_TRUE(session.Close().ok());
  const int status = node.process.Wait(absl::Seconds(10));
  ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status << "\n"
                                 << node.process.LogTail();
  EXPECT_EQ(WEXITSTATUS(status), 0) << node.process.LogTail();
  EXPECT_LT(absl::Now() - closed, absl::Seconds(10));
}

// A call still open when the node stops is cancelled, and its end runs
// on the node's call loop before the loop's queue shuts down. So the node
// exits with status 0 instead of aborting.
TEST(NodeShutdown, SigtermEndsOpenTrainingCall) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), "stop-training", 0, 5,
                               {"--throughput", "1"});
  ASSERT_TRUE(index.ok()) << index.status();
  NodeHandle& node = swarm.node(*index);
  auto stub = StubFor(node.address);

  // A Forward call that has sent part of its request and waits.
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(30));
  auto stream = stub->Forward(&context);
  v1::PayloadChunk chunk;
  chunk.set_data("partial request");
  chunk.set_last(false);
  ASSERT_TRUE(stream->Write(chunk));
  absl::SleepFor(absl::Milliseconds(200));

  node.process.Signal(SIGTERM);
  const int status = node.process.Wait(absl::Seconds(15));
  ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status << "\n"
                                 << node.process.LogTail();
  EXPECT_EQ(WEXITSTATUS(status), 0) << node.process.LogTail();

  stream->WritesDone();
  EXPECT_FALSE(stream->Finish().ok());
}

}  // namespace
}  // namespace pollen::testing
