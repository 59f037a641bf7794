// The SessionSteps stream between a client and real `pollen node`
// processes on loopback, driven with raw gRPC. Steps of several sessions in
// one message give the outputs of each session's own stream, pushed or not.
// Their replies come back together on the stream the steps name. Bad steps
// get an error reply each, and a bad stream a clear status.
#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tensor_codec.h"
#include "node/session_steps_reactor.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "tests/support/raw_session.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr int kHidden = 64;  // stories260k
constexpr char kModelId[] = "stories-steps";

using StepsStream =
    grpc::ClientReaderWriter<v1::SessionStepsRequest, v1::SessionStepsResponse>;

std::unique_ptr<v1::BlockService::Stub> Connect(const std::string& address) {
  return v1::BlockService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

// One SessionSteps stream to one node.
struct Steps {
  std::unique_ptr<v1::BlockService::Stub> stub;
  grpc::ClientContext context;
  std::unique_ptr<StepsStream> stream;
  std::string id;
};

// Opens a SessionSteps stream named `id`; the open travels with the first
// Write.
std::unique_ptr<Steps> OpenSteps(const std::string& address,
                                 const std::string& id) {
  auto steps = std::make_unique<Steps>();
  steps->id = id;
  steps->stub = Connect(address);
  steps->context.set_deadline(std::chrono::system_clock::now() +
                              std::chrono::seconds(60));
  steps->stream = steps->stub->SessionSteps(&steps->context);
  v1::SessionStepsRequest request;
  request.mutable_open()->set_stream_id(id);
  EXPECT_TRUE(steps->stream->Write(request));
  return steps;
}

v1::InferenceStep MakeStep(const std::string& session_id,
                           const at::Tensor& hidden, int position,
                           const std::string& reply_stream_id) {
  v1::InferenceStep step;
  step.set_session_id(session_id);
  step.set_position(position);
  step.set_reply_stream_id(reply_stream_id);
  EXPECT_TRUE(TensorToProto(hidden, step.mutable_hidden_states()).ok());
  return step;
}

class SessionStepsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    swarm_ = new LocalSwarm();
    auto first = swarm_->StartNode(Stories260kDir(), kModelId, 0, 2);
    ASSERT_TRUE(first.ok()) << first.status();
    auto second = swarm_->StartNode(Stories260kDir(), kModelId, 2, 5);
    ASSERT_TRUE(second.ok()) << second.status();
    first_address_ = swarm_->node(*first).address;
    second_address_ = swarm_->node(*second).address;
  }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
  }

  // Runs `hidden` at position 0 through a fresh session on each node's own
  // stream, the client carrying the first output to the second node.
  static at::Tensor Relayed(const at::Tensor& hidden, const std::string& tag) {
    auto first = OpenRawSession(first_address_, kModelId, tag + "-a", 0, 2);
    auto second = OpenRawSession(second_address_, kModelId, tag + "-b", 2, 5);
    at::Tensor current = hidden;
    for (RawSession* session : {first.get(), second.get()}) {
      v1::InferenceRequest request;
      *request.mutable_step() = MakeStep("", current, 0, "");
      v1::InferenceResponse response;
      EXPECT_TRUE(session->stream->Write(request));
      EXPECT_TRUE(session->stream->Read(&response));
      auto output = TensorFromProto(response.hidden_states(), "reference");
      EXPECT_TRUE(output.ok()) << output.status();
      current = output.ok() ? *output : at::Tensor();
    }
    for (RawSession* session : {first.get(), second.get()}) {
      session->stream->WritesDone();
      EXPECT_TRUE(session->stream->Finish().ok());
    }
    return current;
  }

  // Reads messages from `steps` until replies for `count` sessions came,
  // and returns them by session id.
  static std::map<std::string, v1::SessionReply> ReadReplies(Steps& steps,
                                                             size_t count) {
    std::map<std::string, v1::SessionReply> replies;
    v1::SessionStepsResponse response;
    while (replies.size() < count && steps.stream->Read(&response)) {
      for (const v1::SessionReply& reply : response.replies()) {
        replies[reply.session_id()] = reply;
      }
    }
    return replies;
  }

  static LocalSwarm* swarm_;
  static std::string first_address_;
  static std::string second_address_;
};

LocalSwarm* SessionStepsTest::swarm_ = nullptr;
std::string SessionStepsTest::first_address_;
std::string SessionStepsTest::second_address_;

TEST_F(SessionStepsTest, PushedStepsOfSeveralSessionsReplyTogether) {
  at::manual_seed(21);
  constexpr int kSessions = 3;
  std::vector<at::Tensor> inputs;
  std::vector<std::unique_ptr<RawSession>> firsts;
  std::vector<std::unique_ptr<RawSession>> seconds;
  for (int i = 0; i < kSessions; ++i) {
    inputs.push_back(at::randn({1, 2 + i, kHidden}));
    firsts.push_back(OpenRawSession(first_address_, kModelId,
                                    absl::StrCat("pushed-a", i), 0, 2));
    seconds.push_back(OpenRawSession(second_address_, kModelId,
                                     absl::StrCat("pushed-b", i), 2, 5));
  }
  auto to_first = OpenSteps(first_address_, "client-to-first");
  auto from_second = OpenSteps(second_address_, "client-from-second");

  // One message to the first node; each step pushes on to its session on
  // the second node, which replies on the stream the step names.
  v1::SessionStepsRequest request;
  for (int i = 0; i < kSessions; ++i) {
    v1::InferenceStep* step = request.add_steps();
    *step = MakeStep(firsts[i]->id, inputs[i], 0, from_second->id);
    v1::PushTarget* target = step->add_push_to();
    target->set_address(second_address_);
    target->set_session_id(seconds[i]->id);
  }
  ASSERT_TRUE(to_first->stream->Write(request));

  std::map<std::string, v1::SessionReply> replies =
      ReadReplies(*from_second, kSessions);
  ASSERT_EQ(replies.size(), static_cast<size_t>(kSessions));
  for (int i = 0; i < kSessions; ++i) {
    SCOPED_TRACE(i);
    const v1::SessionReply& reply = replies[seconds[i]->id];
    EXPECT_EQ(reply.code(), 0) << reply.message();
    EXPECT_EQ(reply.response().position(), static_cast<uint32_t>(2 + i));
    ASSERT_EQ(reply.response().trail_size(), 1);
    auto output = TensorFromProto(reply.response().hidden_states(), "reply");
    ASSERT_TRUE(output.ok()) << output.status();
    EXPECT_TRUE(at::allclose(*output, Relayed(inputs[i], absl::StrCat("ref", i)),
                             1e-5, 1e-5));
  }

  for (auto* steps : {to_first.get(), from_second.get()}) {
    steps->stream->WritesDone();
    EXPECT_TRUE(steps->stream->Finish().ok());
  }
}

TEST_F(SessionStepsTest, RelayedStepsReplyOnTheSameStream) {
  at::manual_seed(22);
  const at::Tensor prompt = at::randn({1, 3, kHidden});
  const at::Tensor next = at::randn({1, 1, kHidden});
  auto a = OpenRawSession(first_address_, kModelId, "relayed-a", 0, 2);
  auto b = OpenRawSession(first_address_, kModelId, "relayed-b", 0, 2);
  auto steps = OpenSteps(first_address_, "relay-stream");

  v1::SessionStepsRequest request;
  *request.add_steps() = MakeStep(a->id, prompt, 0, steps->id);
  *request.add_steps() = MakeStep(b->id, prompt, 0, steps->id);
  ASSERT_TRUE(steps->stream->Write(request));
  std::map<std::string, v1::SessionReply> replies = ReadReplies(*steps, 2);
  ASSERT_EQ(replies.size(), 2u);
  auto from_a = TensorFromProto(replies[a->id].response().hidden_states(), "a");
  auto from_b = TensorFromProto(replies[b->id].response().hidden_states(), "b");
  ASSERT_TRUE(from_a.ok()) << from_a.status();
  ASSERT_TRUE(from_b.ok()) << from_b.status();
  EXPECT_TRUE(at::equal(*from_a, *from_b));
  EXPECT_EQ(replies[a->id].response().position(), 3u);

  // A step may also come on the session's own stream in between, and one
  // that names no stream, or one not open here, gets its reply there.
  v1::InferenceRequest own;
  *own.mutable_step() = MakeStep("", next, 3, "no-such-stream");
  ASSERT_TRUE(a->stream->Write(own));
  v1::InferenceResponse response;
  ASSERT_TRUE(a->stream->Read(&response));
  EXPECT_EQ(response.position(), 4u);

  request.Clear();
  *request.add_steps() = MakeStep(b->id, next, 3, "");
  ASSERT_TRUE(steps->stream->Write(request));
  ASSERT_TRUE(b->stream->Read(&response));
  EXPECT_EQ(response.position(), 4u);
  auto own_output = TensorFromProto(response.hidden_states(), "own");
  ASSERT_TRUE(own_output.ok());

  steps->stream->WritesDone();
  EXPECT_TRUE(steps->stream->Finish().ok());
  for (RawSession* session : {a.get(), b.get()}) {
    session->stream->WritesDone();
    EXPECT_TRUE(session->stream->Finish().ok());
  }
}

TEST_F(SessionStepsTest, BadStepsGetErrorReplies) {
  auto session = OpenRawSession(first_address_, kModelId, "errors", 0, 2);
  auto steps = OpenSteps(first_address_, "error-stream");

  v1::SessionStepsRequest request;
  *request.add_steps() =
      MakeStep("missing", at::randn({1, 1, kHidden}), 0, steps->id);
  *request.add_steps() =
      MakeStep(session->id, at::randn({1, 1, kHidden}), 5, steps->id);
  *request.add_steps() =
      MakeStep(session->id, at::randn({1, 1, kHidden + 1}), 0, steps->id);
  v1::InferenceStep with_trail =
      MakeStep(session->id, at::randn({1, 1, kHidden}), 0, steps->id);
  with_trail.add_trail();
  *request.add_steps() = with_trail;
  v1::InferenceStep no_input = MakeStep(session->id, at::randn({1, 1, kHidden}),
                                        0, steps->id);
  no_input.clear_hidden_states();
  *request.add_steps() = no_input;
  ASSERT_TRUE(steps->stream->Write(request));

  struct Expected {
    grpc::StatusCode code;
    std::string session;
    std::string text;
  };
  std::vector<v1::SessionReply> replies;
  v1::SessionStepsResponse response;
  while (replies.size() < 5 && steps->stream->Read(&response)) {
    replies.insert(replies.end(), response.replies().begin(),
                   response.replies().end());
  }
  ASSERT_EQ(replies.size(), 5u);
  const std::vector<Expected> expected = {
      {grpc::StatusCode::NOT_FOUND, "missing", "missing"},
      {grpc::StatusCode::ABORTED, session->id, "position 5"},
      {grpc::StatusCode::INVALID_ARGUMENT, session->id, "65"},
      {grpc::StatusCode::INVALID_ARGUMENT, session->id, "trail"},
      {grpc::StatusCode::INVALID_ARGUMENT, session->id, "hidden_states"}};
  for (size_t i = 0; i < expected.size(); ++i) {
    SCOPED_TRACE(expected[i].text);
    EXPECT_EQ(replies[i].code(), static_cast<int>(expected[i].code))
        << replies[i].message();
    EXPECT_EQ(replies[i].session_id(), expected[i].session);
    EXPECT_NE(replies[i].message().find(expected[i].text), std::string::npos)
        << replies[i].message();
  }

  // The session still works.
  request.Clear();
  *request.add_steps() =
      MakeStep(session->id, at::randn({1, 2, kHidden}), 0, steps->id);
  ASSERT_TRUE(steps->stream->Write(request));
  std::map<std::string, v1::SessionReply> ok = ReadReplies(*steps, 1);
  EXPECT_EQ(ok[session->id].code(), 0) << ok[session->id].message();
  EXPECT_EQ(ok[session->id].response().position(), 2u);

  steps->stream->WritesDone();
  EXPECT_TRUE(steps->stream->Finish().ok());
  session->stream->WritesDone();
  EXPECT_TRUE(session->stream->Finish().ok());
}

TEST_F(SessionStepsTest, BadStreamsEndWithClearStatuses) {
  // No open in the first message.
  {
    auto stub = Connect(first_address_);
    grpc::ClientContext context;
    auto stream = stub->SessionSteps(&context);
    v1::SessionStepsRequest request;
    ASSERT_TRUE(stream->Write(request));
    v1::SessionStepsResponse response;
    EXPECT_FALSE(stream->Read(&response));
    const grpc::Status status = stream->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find("open"), std::string::npos)
        << status.error_message();
  }

  // An id that is in use, and one that is too long.
  auto in_use = OpenSteps(first_address_, "taken");
  v1::SessionStepsRequest first_steps;  // makes sure the open was read
  ASSERT_TRUE(in_use->stream->Write(first_steps));
  for (const auto& [id, code, text] :
       {std::make_tuple(std::string("taken"), grpc::StatusCode::ALREADY_EXISTS,
                        std::string("taken")),
        std::make_tuple(std::string(200, 'x'), grpc::StatusCode::INVALID_ARGUMENT,
                        std::string("200"))}) {
    SCOPED_TRACE(text);
    auto steps = OpenSteps(first_address_, id);
    v1::SessionStepsResponse response;
    EXPECT_FALSE(steps->stream->Read(&response));
    const grpc::Status status = steps->stream->Finish();
    EXPECT_EQ(status.error_code(), code);
    EXPECT_NE(status.error_message().find(text), std::string::npos)
        << status.error_message();
  }

  // Too many steps in one message, and a second open.
  for (const bool second_open : {false, true}) {
    auto steps = OpenSteps(first_address_, absl::StrCat("limits", second_open));
    v1::SessionStepsRequest request;
    if (second_open) {
      request.mutable_open()->set_stream_id("again");
    } else {
      for (int i = 0; i <= node::kMaxStepsPerMessage; ++i) request.add_steps();
    }
    ASSERT_TRUE(steps->stream->Write(request));
    v1::SessionStepsResponse response;
    EXPECT_FALSE(steps->stream->Read(&response));
    const grpc::Status status = steps->stream->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find(second_open ? "open" : "1025"),
              std::string::npos)
        << status.error_message();
  }

  in_use->stream->WritesDone();
  EXPECT_TRUE(in_use->stream->Finish().ok());
}

}  // namespace
}  // namespace pollen::testing
