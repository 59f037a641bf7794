// A real `pollen node` process on loopback, driven with raw gRPC requests:
// every bad request gets a clear status and the node keeps serving.
#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <fstream>
#include <filesystem>

#include "common/tensor_codec.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr int kHidden = 64;  // stories260k

class BlockServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    swarm_ = new LocalSwarm();
    auto index = swarm_->StartNode(Stories260kDir(), "stories-service", 2, 4,
                                   {"--cache-tokens", "1000",
                                    "--session-idle-timeout-s", "2"});
    ASSERT_TRUE(index.ok()) << index.status();
    address_ = swarm_->node(*index).address;
  }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
  }

  using Stream =
      grpc::ClientReaderWriter<v1::InferenceRequest, v1::InferenceResponse>;

  // An open Inference stream with its context.
  struct Call {
    std::unique_ptr<grpc::ClientContext> context =
        std::make_unique<grpc::ClientContext>();
    std::unique_ptr<Stream> stream;
  };

  void SetUp() override {
    stub_ = v1::BlockService::NewStub(
        grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  }

  Call StartCall() {
    Call call;
    call.context->set_deadline(std::chrono::system_clock::now() +
                               std::chrono::seconds(30));
    call.stream = stub_->Inference(call.context.get());
    return call;
  }

  static v1::InferenceRequest OpenRequest(const std::string& session_id,
                                          int start = 2, int end = 4,
                                          int max_length = 8) {
    v1::InferenceRequest request;
    request.mutable_open()->set_model_id("stories-service");
    request.mutable_open()->mutable_blocks()->set_start(start);
    request.mutable_open()->mutable_blocks()->set_end(end);
    request.mutable_open()->set_max_length(max_length);
    request.mutable_open()->set_session_id(session_id);
    return request;
  }

  static v1::InferenceRequest StepRequest(const at::Tensor& hidden,
                                          int position) {
    v1::InferenceRequest request;
    EXPECT_TRUE(TensorToProto(hidden, request.mutable_step()->mutable_hidden_states()).ok());
    request.mutable_step()->set_position(position);
    return request;
  }

  // Sends `requests` in order, reading one response after each, and returns
  // the stream's final status. Stops at the first failed read.
  grpc::Status Exchange(const std::vector<v1::InferenceRequest>& requests) {
    Call call = StartCall();
    v1::InferenceResponse response;
    for (const v1::InferenceRequest& request : requests) {
      if (!call.stream->Write(request) || !call.stream->Read(&response)) break;
    }
    call.stream->WritesDone();
    return call.stream->Finish();
  }

  v1::InfoResponse Info() {
    grpc::ClientContext context;
    v1::InfoResponse response;
    EXPECT_TRUE(stub_->Info(&context, v1::InfoRequest(), &response).ok());
    return response;
  }

  // A good session still works: the node survived the bad request.
  void ExpectNodeServes() {
    Call call = StartCall();
    v1::InferenceResponse response;
    ASSERT_TRUE(call.stream->Write(OpenRequest("healthy")));
    ASSERT_TRUE(call.stream->Read(&response));
    ASSERT_TRUE(call.stream->Write(StepRequest(at::randn({1, 3, kHidden}), 0)));
    ASSERT_TRUE(call.stream->Read(&response));
    EXPECT_EQ(response.position(), 3u);
    EXPECT_EQ(response.hidden_states().shape_size(), 3);
    call.stream->WritesDone();
    EXPECT_TRUE(call.stream->Finish().ok());
  }

  static LocalSwarm* swarm_;
  static std::string address_;
  std::unique_ptr<v1::BlockService::Stub> stub_;
};

LocalSwarm* BlockServiceTest::swarm_ = nullptr;
std::string BlockServiceTest::address_;

void ExpectStatus(const grpc::Status& status, grpc::StatusCode code,
                  const std::string& fragment) {
  EXPECT_EQ(status.error_code(), code) << status.error_message();
  EXPECT_NE(status.error_message().find(fragment), std::string::npos)
      << "message: " << status.error_message();
}

TEST_F(BlockServiceTest, InfoReportsSpanAndCache) {
  const v1::InfoResponse info = Info();
  ASSERT_EQ(info.spans_size(), 1);
  EXPECT_EQ(info.spans(0).model_id(), "stories-service");
  EXPECT_EQ(info.spans(0).blocks().start(), 2u);
  EXPECT_EQ(info.spans(0).blocks().end(), 4u);
  EXPECT_EQ(info.cache_tokens_total(), 1000u);
  EXPECT_FALSE(info.node_id().empty());
}

// gRPC's callback API would add two threads that take turns polling, and a
// wakeup of the second one per message. The node runs its calls on one
// thread instead (node/call_loop.h).
TEST_F(BlockServiceTest, NodeHasNoCallbackThreads) {
  Call call = StartCall();
  v1::InferenceResponse response;
  ASSERT_TRUE(call.stream->Write(OpenRequest("threads")));
  ASSERT_TRUE(call.stream->Read(&response));
  Info();

  const pid_t pid = swarm_->node(0).process.pid();
  std::vector<std::string> names;
  for (const auto& task : std::filesystem::directory_iterator(
           "/proc/" + std::to_string(pid) + "/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    std::getline(comm, name);
    names.push_back(name);
  }
  EXPECT_GT(names.size(), 1u);
  for (const std::string& name : names) {
    EXPECT_NE(name, "nexting_thread") << "thread of node process " << pid;
  }
  call.stream->WritesDone();
  EXPECT_TRUE(call.stream->Finish().ok());
}

TEST_F(BlockServiceTest, ValidSessionRunsPrefillAndDecode) {
  Call call = StartCall();
  v1::InferenceResponse response;
  ASSERT_TRUE(call.stream->Write(OpenRequest("valid")));
  ASSERT_TRUE(call.stream->Read(&response));
  ASSERT_TRUE(call.stream->Write(StepRequest(at::randn({1, 4, kHidden}), 0)));
  ASSERT_TRUE(call.stream->Read(&response));
  ASSERT_TRUE(call.stream->Write(StepRequest(at::randn({1, 1, kHidden}), 4)));
  ASSERT_TRUE(call.stream->Read(&response));
  EXPECT_EQ(response.position(), 5u);
  auto output = TensorFromProto(response.hidden_states(), "output");
  ASSERT_TRUE(output.ok());
  EXPECT_EQ(output->sizes(), (std::vector<int64_t>{1, 1, kHidden}));
  call.stream->WritesDone();
  EXPECT_TRUE(call.stream->Finish().ok());
}

TEST_F(BlockServiceTest, RejectsWrongHiddenSize) {
  ExpectStatus(Exchange({OpenRequest("hidden"),
                         StepRequest(at::randn({1, 2, kHidden + 1}), 0)}),
               grpc::StatusCode::INVALID_ARGUMENT, "hidden 64");
  ExpectNodeServes();
}

TEST_F(BlockServiceTest, RejectsWrongDtype) {
  v1::InferenceRequest step = StepRequest(at::randn({1, 2, kHidden}), 0);
  step.mutable_step()->mutable_hidden_states()->set_dtype(v1::DTYPE_UNSPECIFIED);
  ExpectStatus(Exchange({OpenRequest("dtype"), step}),
               grpc::StatusCode::INVALID_ARGUMENT, "unsupported tensor dtype");
  ExpectNodeServes();
}

TEST_F(BlockServiceTest, RejectsTooManyTokensForMaxLength) {
  ExpectStatus(Exchange({OpenRequest("long", 2, 4, 4),
                         StepRequest(at::randn({1, 5, kHidden}), 0)}),
               grpc::StatusCode::INVALID_ARGUMENT, "exceeds max_length 4");
  ExpectNodeServes();
}

TEST_F(BlockServiceTest, RejectsUnknownSession) {
  v1::InferenceRequest step = StepRequest(at::randn({1, 1, kHidden}), 0);
  step.mutable_step()->set_session_id("no-such-session");
  ExpectStatus(Exchange({OpenRequest("known"), step}),
               grpc::StatusCode::NOT_FOUND, "no-such-session");
  ExpectNodeServes();
}

TEST_F(BlockServiceTest, RejectsStepBeforeOpen) {
  ExpectStatus(Exchange({StepRequest(at::randn({1, 1, kHidden}), 0)}),
               grpc::StatusCode::FAILED_PRECONDITION, "must be 'open'");
}

TEST_F(BlockServiceTest, RejectsBlocksOutsideSpan) {
  ExpectStatus(Exchange({OpenRequest("outside", 3, 9)}),
               grpc::StatusCode::INVALID_ARGUMENT, "span 2:4");
  ExpectStatus(Exchange({OpenRequest("empty", 3, 3)}),
               grpc::StatusCode::INVALID_ARGUMENT, "blocks 3:3");
  ExpectNodeServes();
}

TEST_F(BlockServiceTest, RejectsOtherModel) {
  v1::InferenceRequest open = OpenRequest("model");
  open.mutable_open()->set_model_id("llama-70b");
  ExpectStatus(Exchange({open}), grpc::StatusCode::NOT_FOUND, "llama-70b");
}

TEST_F(BlockServiceTest, RejectsMaxLengthBeyondModel) {
  ExpectStatus(Exchange({OpenRequest("huge", 2, 4, 100000)}),
               grpc::StatusCode::INVALID_ARGUMENT, "max_position_embeddings");
}

TEST_F(BlockServiceTest, RejectsPositionOutOfStep) {
  ExpectStatus(Exchange({OpenRequest("position"),
                         StepRequest(at::randn({1, 2, kHidden}), 3)}),
               grpc::StatusCode::ABORTED, "position 3");
}

TEST_F(BlockServiceTest, RejectsSessionBeyondCacheBudget) {
  // 1000 cache tokens: one session of 600 fits, a second one does not.
  Call first = StartCall();
  v1::InferenceResponse response;
  ASSERT_TRUE(first.stream->Write(OpenRequest("big-1", 2, 4, 500)));
  ASSERT_TRUE(first.stream->Read(&response));

  v1::InferenceRequest second = OpenRequest("big-2", 2, 4, 300);
  second.mutable_open()->set_batch_size(2);
  ExpectStatus(Exchange({second}), grpc::StatusCode::RESOURCE_EXHAUSTED,
               "needs 600 cache tokens");

  // Closing the first session returns its tokens.
  first.stream->WritesDone();
  EXPECT_TRUE(first.stream->Finish().ok());
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(Info().cache_tokens_left(), 1000u);
  ExpectNodeServes();
}

TEST_F(BlockServiceTest, FreesIdleSession) {
  Call call = StartCall();
  v1::InferenceResponse response;
  ASSERT_TRUE(call.stream->Write(OpenRequest("idle", 2, 4, 100)));
  ASSERT_TRUE(call.stream->Read(&response));
  EXPECT_EQ(Info().cache_tokens_left(), 900u);

  // The node runs with a 2 s idle timeout and checks once a second.
  absl::SleepFor(absl::Seconds(4));
  EXPECT_EQ(Info().cache_tokens_left(), 1000u);
  ASSERT_TRUE(call.stream->Write(StepRequest(at::randn({1, 1, kHidden}), 0)));
  EXPECT_FALSE(call.stream->Read(&response));
  ExpectStatus(call.stream->Finish(), grpc::StatusCode::NOT_FOUND, "idle");
}

TEST_F(BlockServiceTest, SecondNodeCannotShareItsPort) {
  const std::string port = address_.substr(address_.rfind(':') + 1);
  const CommandResult result = RunCommand(
      {PollenBinary(), "node", "--model", Stories260kDir(), "--blocks", "0:1",
       "--host", "127.0.0.1", "--port", port, "--initial-peers",
       swarm_->peer()});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.stderr_text.find("cannot listen on 127.0.0.1:" + port),
            std::string::npos)
      << result.stderr_text;
  ExpectNodeServes();
}

TEST(NodeStartup, FailsClearlyOnMissingModel) {
  TempDir dir;
  const CommandResult result = RunCommand(
      {PollenBinary(), "node", "--model", dir.path() + "/missing", "--blocks",
       "0:1"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_NE(result.stderr_text.find(dir.path() + "/missing"), std::string::npos)
      << result.stderr_text;
}

TEST(NodeStartup, FailsClearlyOnTruncatedWeights) {
  TempDir dir;
  for (const char* file : {"config.json", "tokenizer.model"}) {
    std::filesystem::copy_file(Stories260kDir() + "/" + file,
                               dir.path() + "/" + file);
  }
  const std::string weights = Stories260kDir() + "/model.safetensors";
  const auto size = std::filesystem::file_size(weights);
  {
    std::ifstream in(weights, std::ios::binary);
    std::string bytes(size / 2, '\0');
    in.read(bytes.data(), bytes.size());
    std::ofstream(dir.path() + "/model.safetensors", std::ios::binary) << bytes;
  }
  const CommandResult result = RunCommand(
      {PollenBinary(), "node", "--model", dir.path(), "--blocks", "0:5"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.stderr_text.find("model.safetensors"), std::string::npos)
      << result.stderr_text;
}

TEST(NodeStartup, FailsClearlyOnBlocksOutsideModel) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "node", "--model", Stories260kDir(), "--blocks", "3:9"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_NE(result.stderr_text.find("9"), std::string::npos) << result.stderr_text;
  EXPECT_NE(result.stderr_text.find("5"), std::string::npos) << result.stderr_text;
}

}  // namespace
}  // namespace pollen::testing
