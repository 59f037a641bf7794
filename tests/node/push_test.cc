// Server-to-server push between two real `pollen node` processes on
// loopback, driven with raw gRPC streams: a pushed step gives the same
// hidden states as a relayed one and comes back with the first node's
// output in its trail. A push that cannot be delivered, or whose target
// never announced the next block, falls back to the client, and bad pushes
// get clear statuses.
#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tensor_codec.h"
#include "node/step_pusher.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "tests/support/raw_session.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr int kHidden = 64;  // stories260k
constexpr char kModelId[] = "stories-push";

using Session = RawSession;

class PushTest : public ::testing::Test {
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

  // Opens session `id` for blocks [start, end) on the node at `address`.
  static std::unique_ptr<Session> Open(const std::string& address,
                                       const std::string& id, int start,
                                       int end) {
    return OpenRawSession(address, kModelId, id, start, end);
  }

  static v1::InferenceRequest Step(const at::Tensor& hidden, int position) {
    v1::InferenceRequest request;
    EXPECT_TRUE(
        TensorToProto(hidden, request.mutable_step()->mutable_hidden_states())
            .ok());
    request.mutable_step()->set_position(position);
    return request;
  }

  static void AddTarget(v1::InferenceRequest* request,
                        const std::string& address,
                        const std::string& session_id) {
    v1::PushTarget* target = request->mutable_step()->add_push_to();
    target->set_address(address);
    target->set_session_id(session_id);
  }

  // Writes `request`, reads the reply, and returns its hidden states.
  static at::Tensor Exchange(Session& session,
                             const v1::InferenceRequest& request,
                             v1::InferenceResponse* response) {
    EXPECT_TRUE(session.stream->Write(request));
    EXPECT_TRUE(session.stream->Read(response));
    auto hidden = TensorFromProto(response->hidden_states(), "reply");
    EXPECT_TRUE(hidden.ok()) << hidden.status();
    return hidden.ok() ? *hidden : at::Tensor();
  }

  // Writes `request`, which the node must reject by ending the stream, and
  // returns the stream's status.
  static grpc::Status WriteAndFinish(Session& session,
                                     const v1::InferenceRequest& request) {
    v1::InferenceResponse response;
    EXPECT_TRUE(session.stream->Write(request));
    EXPECT_FALSE(session.stream->Read(&response));
    session.stream->WritesDone();
    return session.stream->Finish();
  }

  static grpc::Status Close(Session& session) {
    session.stream->WritesDone();
    return session.stream->Finish();
  }

  // A pushed step for `session_id` at `position` whose input is `hidden`.
  static v1::PushedStep Pushed(const std::string& session_id, int position,
                               const at::Tensor& hidden) {
    v1::PushedStep pushed;
    pushed.set_from_session_id("test-sender");
    pushed.mutable_step()->set_session_id(session_id);
    pushed.mutable_step()->set_position(position);
    EXPECT_TRUE(TensorToProto(hidden, pushed.mutable_step()
                                          ->add_trail()
                                          ->mutable_hidden_states())
                    .ok());
    return pushed;
  }

  // Opens a PushSteps stream to the second node, as a pushing node would.
  struct PushStream {
    std::unique_ptr<v1::BlockService::Stub> stub;
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReaderWriter<v1::PushRequest, v1::PushRejection>>
        stream;
  };
  static std::unique_ptr<PushStream> OpenPushStream() {
    auto push = std::make_unique<PushStream>();
    push->stub = v1::BlockService::NewStub(grpc::CreateChannel(
        second_address_, grpc::InsecureChannelCredentials()));
    push->context.set_deadline(std::chrono::system_clock::now() +
                               std::chrono::seconds(60));
    push->stream = push->stub->PushSteps(&push->context);
    return push;
  }

  static LocalSwarm* swarm_;
  static std::string first_address_;
  static std::string second_address_;
};

LocalSwarm* PushTest::swarm_ = nullptr;
std::string PushTest::first_address_;
std::string PushTest::second_address_;

TEST(PushBatchTest, WorkRunsAfterOutermostBatch) {
  std::vector<std::string> order;
  node::StepPusher::Batch::RunAfterPushes([&order] { order.push_back("alone"); });
  EXPECT_EQ(order, std::vector<std::string>{"alone"});

  {
    node::StepPusher::Batch outer;
    {
      node::StepPusher::Batch inner;
      node::StepPusher::Batch::RunAfterPushes(
          [&order] { order.push_back("inner"); });
    }
    EXPECT_EQ(order.size(), 1u);
    node::StepPusher::Batch::RunAfterPushes(
        [&order] { order.push_back("outer"); });
    EXPECT_EQ(order.size(), 1u);
  }
  EXPECT_EQ(order, (std::vector<std::string>{"alone", "inner", "outer"}));
}

TEST_F(PushTest, PushedStepsMatchRelayedSteps) {
  at::manual_seed(7);
  const at::Tensor prompt = at::randn({1, 4, kHidden});
  const at::Tensor next = at::randn({1, 1, kHidden});

  // Relay: the client carries the first node's output to the second.
  auto relay_first = Open(first_address_, "relay-a", 0, 2);
  auto relay_second = Open(second_address_, "relay-b", 2, 5);
  v1::InferenceResponse response;
  at::Tensor expected_prompt = Exchange(
      *relay_second,
      Step(Exchange(*relay_first, Step(prompt, 0), &response), 0), &response);
  at::Tensor expected_next = Exchange(
      *relay_second,
      Step(Exchange(*relay_first, Step(next, 4), &response), 4), &response);

  // Push: the client writes only to the first node, and the second node
  // replies with the first node's output in the trail.
  auto first = Open(first_address_, "push-a", 0, 2);
  auto second = Open(second_address_, "push-b", 2, 5);
  for (const auto& [input, position, expected] :
       {std::make_tuple(prompt, 0, expected_prompt),
        std::make_tuple(next, 4, expected_next)}) {
    v1::InferenceRequest request = Step(input, position);
    AddTarget(&request, second_address_, "push-b");
    ASSERT_TRUE(first->stream->Write(request));

    ASSERT_TRUE(second->stream->Read(&response));
    auto output = TensorFromProto(response.hidden_states(), "pushed reply");
    ASSERT_TRUE(output.ok()) << output.status();
    EXPECT_EQ(response.position(), position + input.size(1));
    EXPECT_TRUE(at::equal(*output, expected));
    ASSERT_EQ(response.trail_size(), 1);
    auto first_output =
        TensorFromProto(response.trail(0).hidden_states(), "trail");
    ASSERT_TRUE(first_output.ok()) << first_output.status();
    EXPECT_EQ(first_output->sizes(), input.sizes());
  }

  for (Session* session :
       {relay_first.get(), relay_second.get(), first.get(), second.get()}) {
    EXPECT_TRUE(Close(*session).ok()) << session->id;
  }
}

TEST_F(PushTest, UndeliverablePushFallsBack) {
  at::manual_seed(8);
  const at::Tensor prompt = at::randn({1, 3, kHidden});
  auto first = Open(first_address_, "fallback-a", 0, 2);
  auto second = Open(second_address_, "fallback-b", 2, 5);
  v1::InferenceResponse response;

  // An unknown session on the next node: it sends the step back, and the
  // first node replies to the client with its output.
  v1::InferenceRequest request = Step(prompt, 0);
  AddTarget(&request, second_address_, "no-such-session");
  at::Tensor output = Exchange(*first, request, &response);
  EXPECT_EQ(response.position(), 3u);
  EXPECT_EQ(response.trail_size(), 0);
  EXPECT_EQ(output.sizes(), prompt.sizes());

  // The client relays, and the second node runs the step as usual.
  at::Tensor relayed = Exchange(*second, Step(output, 0), &response);
  EXPECT_EQ(response.position(), 3u);
  EXPECT_EQ(relayed.sizes(), prompt.sizes());

  // A port with no server.
  request = Step(at::randn({1, 1, kHidden}), 3);
  AddTarget(&request, "127.0.0.1:1", "fallback-b");
  Exchange(*first, request, &response);
  EXPECT_EQ(response.position(), 4u);

  EXPECT_TRUE(Close(*first).ok());
  EXPECT_TRUE(Close(*second).ok());
}

TEST_F(PushTest, UnannouncedTargetGetsNoPush) {
  at::manual_seed(9);
  const at::Tensor prompt = at::randn({1, 3, kHidden});
  auto source = Open(first_address_, "unannounced-a", 0, 2);
  auto target = Open(first_address_, "unannounced-b", 0, 2);

  // The first node serves blocks 0:2 and never announced block 2, so it
  // does not push there, and replies to the client itself.
  v1::InferenceRequest request = Step(prompt, 0);
  AddTarget(&request, first_address_, "unannounced-b");
  v1::InferenceResponse response;
  Exchange(*source, request, &response);
  EXPECT_EQ(response.position(), 3u);

  // The target session still contains no tokens.
  Exchange(*target, Step(prompt, 0), &response);
  EXPECT_EQ(response.position(), 3u);

  EXPECT_TRUE(Close(*source).ok());
  EXPECT_TRUE(Close(*target).ok());
}

TEST_F(PushTest, BadPushesGetClearStatuses) {
  auto second = Open(second_address_, "target", 2, 5);
  auto push = OpenPushStream();

  // Every bad step in one message comes back on its own, with its reason.
  v1::PushRequest request;
  *request.add_steps() = Pushed("missing", 0, at::randn({1, 1, kHidden}));
  *request.add_steps() = Pushed("target", 5, at::randn({1, 1, kHidden}));
  *request.add_steps() = Pushed("", 0, at::randn({1, 1, kHidden}));
  *request.add_steps() = Pushed("target", 0, at::randn({1, 1, kHidden + 1}));
  v1::PushedStep no_trail = Pushed("target", 0, at::randn({1, 1, kHidden}));
  no_trail.mutable_step()->mutable_hidden_states()->Swap(
      no_trail.mutable_step()->mutable_trail(0)->mutable_hidden_states());
  no_trail.mutable_step()->clear_trail();
  *request.add_steps() = no_trail;
  ASSERT_TRUE(push->stream->Write(request));

  struct Expected {
    grpc::StatusCode code;
    std::string session;
    std::string text;
  };
  for (const Expected& expected :
       {Expected{grpc::StatusCode::NOT_FOUND, "missing", "missing"},
        Expected{grpc::StatusCode::ABORTED, "target", "position 5"},
        Expected{grpc::StatusCode::INVALID_ARGUMENT, "", "session_id"},
        Expected{grpc::StatusCode::INVALID_ARGUMENT, "target", "65"},
        Expected{grpc::StatusCode::INVALID_ARGUMENT, "target", "trail"}}) {
    v1::PushRejection rejection;
    ASSERT_TRUE(push->stream->Read(&rejection)) << expected.text;
    EXPECT_EQ(rejection.code(), static_cast<int>(expected.code))
        << rejection.message();
    EXPECT_NE(rejection.message().find(expected.text), std::string::npos)
        << rejection.message();
    EXPECT_EQ(rejection.pushed().step().session_id(), expected.session);
    EXPECT_EQ(rejection.pushed().from_session_id(), "test-sender");
  }

  // The session still works, from the client and from a push, whose reply
  // carries the pushed input as its trail.
  v1::InferenceResponse response;
  Exchange(*second, Step(at::randn({1, 2, kHidden}), 0), &response);
  EXPECT_EQ(response.position(), 2u);
  request.Clear();
  *request.add_steps() = Pushed("target", 2, at::randn({1, 1, kHidden}));
  ASSERT_TRUE(push->stream->Write(request));
  ASSERT_TRUE(second->stream->Read(&response));
  EXPECT_EQ(response.position(), 3u);
  EXPECT_EQ(response.trail_size(), 1);

  push->stream->WritesDone();
  EXPECT_TRUE(push->stream->Finish().ok());
  EXPECT_TRUE(Close(*second).ok());
}

TEST_F(PushTest, StepsInOneMessageAllRun) {
  auto first = Open(second_address_, "together-1", 2, 5);
  auto second = Open(second_address_, "together-2", 2, 5);
  auto push = OpenPushStream();
  v1::PushRequest request;
  *request.add_steps() = Pushed("together-1", 0, at::randn({1, 2, kHidden}));
  *request.add_steps() = Pushed("together-2", 0, at::randn({1, 3, kHidden}));
  ASSERT_TRUE(push->stream->Write(request));

  v1::InferenceResponse response;
  ASSERT_TRUE(first->stream->Read(&response));
  EXPECT_EQ(response.position(), 2u);
  ASSERT_TRUE(second->stream->Read(&response));
  EXPECT_EQ(response.position(), 3u);

  push->stream->WritesDone();
  EXPECT_TRUE(push->stream->Finish().ok());
  EXPECT_TRUE(Close(*first).ok());
  EXPECT_TRUE(Close(*second).ok());
}

TEST_F(PushTest, ClientStepWithTrailIsRejected) {
  auto first = Open(first_address_, "client-trail", 0, 2);
  v1::InferenceRequest request = Step(at::randn({1, 1, kHidden}), 0);
  ASSERT_TRUE(TensorToProto(at::randn({1, 1, kHidden}),
                            request.mutable_step()
                                ->add_trail()
                                ->mutable_hidden_states())
                  .ok());
  const grpc::Status status = WriteAndFinish(*first, request);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("trail"), std::string::npos);
}

TEST_F(PushTest, BadTargetFailsBeforeStep) {
  auto first = Open(first_address_, "bad-target", 0, 2);
  v1::InferenceRequest request = Step(at::randn({1, 1, kHidden}), 0);
  AddTarget(&request, std::string(300, 'x') + ":1", "b");
  const grpc::Status status = WriteAndFinish(*first, request);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("255"), std::string::npos);
}

TEST_F(PushTest, TooManyHopsAreRejected) {
  auto first = Open(first_address_, "too-many-hops", 0, 2);
  v1::InferenceRequest request = Step(at::randn({1, 1, kHidden}), 0);
  for (int i = 0; i < 257; ++i) {
    AddTarget(&request, second_address_, absl::StrCat("hop-", i));
  }
  const grpc::Status status = WriteAndFinish(*first, request);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("257"), std::string::npos)
      << status.error_message();
  EXPECT_NE(status.error_message().find("256"), std::string::npos)
      << status.error_message();
}

}  // namespace
}  // namespace pollen::testing
