// Forward and Backward RPCs and LoRA inference sessions against a real
// `pollen node` process on loopback, checked against in-process passes.
#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/checkpoint.h"
#include "common/payload_chunks.h"
#include "common/tensor_codec.h"
#include "node/adapters.h"
#include "node/block_span.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

using node::BlockAdapter;
using node::LoraAdapter;

constexpr int kHidden = 64;  // stories260k
constexpr char kModel[] = "stories-train";

using ChunkStream = grpc::ClientReaderWriter<v1::PayloadChunk, v1::PayloadChunk>;

// What a chunked call sent and got back.
struct ChunkedReply {
  grpc::Status status;
  std::string payload;
  int chunks_sent = 0;
  int chunks_received = 0;
};

class TrainingServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    swarm_ = new LocalSwarm();
    auto index = swarm_->StartNode(Stories260kDir(), kModel, 1, 4,
                                   {"--cache-tokens", "1000"});
    ASSERT_TRUE(index.ok()) << index.status();
    address_ = swarm_->node(*index).address;

    auto checkpoint = Checkpoint::Open(Stories260kDir());
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    auto span = node::BlockSpan::Load(**checkpoint, 1, 4, at::kFloat, at::kCPU);
    ASSERT_TRUE(span.ok()) << span.status();
    span_ = span->release();
  }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
    delete span_;
    span_ = nullptr;
  }

  void SetUp() override {
    at::manual_seed(3);
    stub_ = v1::BlockService::NewStub(
        grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  }

  // Sends `chunks` on a Forward (or Backward) call and joins the reply.
  ChunkedReply Call(bool backward, const std::vector<v1::PayloadChunk>& chunks) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(120));
    std::unique_ptr<ChunkStream> stream =
        backward ? stub_->Backward(&context) : stub_->Forward(&context);
    ChunkedReply reply;
    for (const v1::PayloadChunk& chunk : chunks) {
      if (!stream->Write(chunk)) break;
      ++reply.chunks_sent;
    }
    stream->WritesDone();
    Reassembler reassembler;
    v1::PayloadChunk chunk;
    while (stream->Read(&chunk)) {
      ++reply.chunks_received;
      EXPECT_TRUE(reassembler.Add(chunk).ok());
    }
    reply.status = stream->Finish();
    if (reply.status.ok()) {
      auto payload = reassembler.Take();
      EXPECT_TRUE(payload.ok()) << payload.status();
      if (payload.ok()) reply.payload = *payload;
    }
    return reply;
  }

  static v1::ForwardRequest MakeForward(const at::Tensor& hidden,
                                        const std::map<int, BlockAdapter>& adapters,
                                        int start = 1, int end = 4) {
    v1::ForwardRequest request;
    request.set_model_id(kModel);
    request.mutable_blocks()->set_start(start);
    request.mutable_blocks()->set_end(end);
    EXPECT_TRUE(TensorToProto(hidden, request.mutable_hidden_states()).ok());
    EXPECT_TRUE(node::AdaptersToProto(adapters, request.mutable_adapters()).ok());
    return request;
  }

  static v1::BackwardRequest MakeBackward(
      const at::Tensor& hidden, const std::map<int, BlockAdapter>& adapters,
      const at::Tensor& grad_outputs) {
    v1::BackwardRequest request;
    *request.mutable_forward() = MakeForward(hidden, adapters);
    EXPECT_TRUE(TensorToProto(grad_outputs, request.mutable_grad_outputs()).ok());
    return request;
  }

  // Prompts on blocks 1 and 3, LoRA on blocks 1 and 2.
  static std::map<int, BlockAdapter> SomeAdapters(int64_t prefix,
                                                  int64_t prompt_batch = 1) {
    std::map<int, BlockAdapter> adapters;
    adapters[1].prompt = at::randn({prompt_batch, prefix, kHidden}) * 0.5;
    adapters[1].lora["q_proj"] =
        LoraAdapter{at::randn({4, 64}) * 0.1, at::randn({64, 4}) * 0.1, 2.0};
    adapters[2].lora["up_proj"] =
        LoraAdapter{at::randn({2, 64}) * 0.1, at::randn({172, 2}) * 0.1, 1.0};
    adapters[3].prompt = at::randn({prompt_batch, prefix, kHidden}) * 0.5;
    return adapters;
  }

  static void ExpectClose(const at::Tensor& actual, const at::Tensor& expected,
                          const std::string& what) {
    ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
    EXPECT_TRUE(at::allclose(actual, expected, 1e-5, 1e-6))
        << what << " differs by " << (actual - expected).abs().max().item<double>();
  }

  // Runs a Backward call and compares it with RunBackward in this process.
  void ExpectBackwardMatches(const at::Tensor& hidden,
                             const std::map<int, BlockAdapter>& adapters,
                             bool expect_several_chunks) {
    const at::Tensor grad_outputs = at::randn(hidden.sizes());
    const std::vector<v1::PayloadChunk> chunks =
        SplitMessage(MakeBackward(hidden, adapters, grad_outputs));
    const ChunkedReply reply = Call(/*backward=*/true, chunks);
    ASSERT_TRUE(reply.status.ok()) << reply.status.error_message();
    if (expect_several_chunks) {
      EXPECT_GT(reply.chunks_sent, 1);
      EXPECT_GT(reply.chunks_received, 1);
    }
    v1::BackwardResponse response;
    ASSERT_TRUE(response.ParseFromString(reply.payload));

    auto expected =
        node::RunBackward(*span_, 1, 4, hidden, adapters, grad_outputs);
    ASSERT_TRUE(expected.ok()) << expected.status();
    auto grad_inputs = TensorFromProto(response.grad_inputs(), "grad_inputs");
    ASSERT_TRUE(grad_inputs.ok()) << grad_inputs.status();
    ExpectClose(*grad_inputs, expected->grad_inputs, "grad_inputs");

    auto grads = node::AdaptersFromProto(response.grad_adapters(),
                                         span_->config(), 1, 4, hidden.size(0),
                                         hidden.size(1));
    ASSERT_TRUE(grads.ok()) << grads.status();
    ASSERT_EQ(grads->size(), expected->grad_adapters.size());
    for (auto& [block, grad] : expected->grad_adapters) {
      BlockAdapter& received = (*grads)[block];
      if (grad.prompt.defined()) {
        ExpectClose(received.prompt, grad.prompt, "prompt grad");
      }
      ASSERT_EQ(received.lora.size(), grad.lora.size());
      for (auto& [target, lora] : grad.lora) {
        ExpectClose(received.lora[target].a, lora.a, target + " a grad");
        ExpectClose(received.lora[target].b, lora.b, target + " b grad");
      }
    }
  }

  void ExpectStatus(const grpc::Status& status, grpc::StatusCode code,
                    const std::string& fragment) {
    EXPECT_EQ(status.error_code(), code) << status.error_message();
    EXPECT_NE(status.error_message().find(fragment), std::string::npos)
        << "message: " << status.error_message();
  }

  // A good Forward call still works: the node survived the bad request.
  void ExpectNodeServes() {
    const ChunkedReply reply = Call(
        false, SplitMessage(MakeForward(at::randn({1, 3, kHidden}), {})));
    EXPECT_TRUE(reply.status.ok()) << reply.status.error_message();
  }

  static LocalSwarm* swarm_;
  static std::string address_;
  static node::BlockSpan* span_;
  std::unique_ptr<v1::BlockService::Stub> stub_;
};

LocalSwarm* TrainingServiceTest::swarm_ = nullptr;
std::string TrainingServiceTest::address_;
node::BlockSpan* TrainingServiceTest::span_ = nullptr;

TEST_F(TrainingServiceTest, ForwardMatchesInProcess) {
  const at::Tensor hidden = at::randn({2, 6, kHidden});
  const std::map<int, BlockAdapter> adapters = SomeAdapters(2);
  const ChunkedReply reply =
      Call(false, SplitMessage(MakeForward(hidden, adapters)));
  ASSERT_TRUE(reply.status.ok()) << reply.status.error_message();
  v1::ForwardResponse response;
  ASSERT_TRUE(response.ParseFromString(reply.payload));
  auto outputs = TensorFromProto(response.hidden_states(), "outputs");
  ASSERT_TRUE(outputs.ok()) << outputs.status();

  at::NoGradGuard no_grad;
  auto expected = span_->ForwardNoCache(hidden, 1, 4, adapters);
  ASSERT_TRUE(expected.ok()) << expected.status();
  ExpectClose(*outputs, *expected, "outputs");
}

TEST_F(TrainingServiceTest, BackwardMatchesInProcess) {
  ExpectBackwardMatches(at::randn({2, 6, kHidden}), SomeAdapters(3),
                        /*expect_several_chunks=*/false);
}

TEST_F(TrainingServiceTest, LargePayloadTravelsInChunks) {
  // 64 x 128 x 64 floats are 2 MiB per tensor: the request (inputs, two
  // per-sequence prompts, gradients) and the reply (gradients of the inputs
  // and both prompts) each exceed 4 MiB.
  ExpectBackwardMatches(at::randn({64, 128, kHidden}), SomeAdapters(128, 64),
                        /*expect_several_chunks=*/true);
}

TEST_F(TrainingServiceTest, RejectsHiddenSizeMismatch) {
  ExpectStatus(
      Call(false, SplitMessage(MakeForward(at::randn({1, 3, kHidden + 1}), {})))
          .status,
      grpc::StatusCode::INVALID_ARGUMENT, "hidden 64");
  ExpectNodeServes();
}

TEST_F(TrainingServiceTest, RejectsWrongGradSize) {
  const at::Tensor hidden = at::randn({1, 4, kHidden});
  ExpectStatus(
      Call(true, SplitMessage(MakeBackward(hidden, {}, at::randn({1, 3, kHidden}))))
          .status,
      grpc::StatusCode::INVALID_ARGUMENT,
      "grad_outputs shape [1, 3, 64] does not match the outputs [1, 4, 64]");
  ExpectNodeServes();
}

TEST_F(TrainingServiceTest, RejectsLoraRankMismatch) {
  std::map<int, BlockAdapter> adapters;
  adapters[2].lora["o_proj"] =
      LoraAdapter{at::randn({4, 64}), at::randn({64, 5}), 1.0};
  ExpectStatus(
      Call(false, SplitMessage(MakeForward(at::randn({1, 3, kHidden}), adapters)))
          .status,
      grpc::StatusCode::INVALID_ARGUMENT,
      "block 2 LoRA o_proj b has shape [64, 5], expected [64, 4]");
  ExpectNodeServes();
}

TEST_F(TrainingServiceTest, RejectsUnknownTarget) {
  std::map<int, BlockAdapter> adapters;
  adapters[2].lora["lm_head"] =
      LoraAdapter{at::randn({4, 64}), at::randn({64, 4}), 1.0};
  ExpectStatus(
      Call(false, SplitMessage(MakeForward(at::randn({1, 3, kHidden}), adapters)))
          .status,
      grpc::StatusCode::INVALID_ARGUMENT, "'lm_head' is unknown");
  ExpectNodeServes();
}

TEST_F(TrainingServiceTest, RejectsPromptLongerThanSequence) {
  std::map<int, BlockAdapter> adapters;
  adapters[1].prompt = at::randn({1, 4, kHidden});
  ExpectStatus(
      Call(false, SplitMessage(MakeForward(at::randn({1, 3, kHidden}), adapters)))
          .status,
      grpc::StatusCode::INVALID_ARGUMENT, "block 1 prompt has shape [1, 4, 64]");
  ExpectNodeServes();
}

TEST_F(TrainingServiceTest, RejectsBlocksOutsideSpan) {
  ExpectStatus(
      Call(false, SplitMessage(MakeForward(at::randn({1, 3, kHidden}), {}, 0, 2)))
          .status,
      grpc::StatusCode::UNAVAILABLE, "not served by this node");
  ExpectNodeServes();
}

TEST_F(TrainingServiceTest, RejectsOtherModel) {
  v1::ForwardRequest request = MakeForward(at::randn({1, 3, kHidden}), {});
  request.set_model_id("llama-70b");
  ExpectStatus(Call(false, SplitMessage(request)).status,
               grpc::StatusCode::NOT_FOUND, "llama-70b");
}

TEST_F(TrainingServiceTest, RejectsMissingLast) {
  std::vector<v1::PayloadChunk> chunks = SplitMessage(
      MakeForward(at::randn({1, 3, kHidden}), {}), /*max_chunk_bytes=*/100);
  chunks.back().set_last(false);
  ExpectStatus(Call(false, chunks).status, grpc::StatusCode::INVALID_ARGUMENT,
               "without a chunk marked last");
  ExpectNodeServes();
}

TEST_F(TrainingServiceTest, RejectsGarbage) {
  v1::PayloadChunk chunk;
  chunk.set_data("\xff\xff\xff garbage");
  chunk.set_last(true);
  ExpectStatus(Call(true, {chunk}).status, grpc::StatusCode::INVALID_ARGUMENT,
               "could not parse BackwardRequest");
  ExpectNodeServes();
}

// Runs `hidden` [1, 6, hidden] through an Inference session on blocks
// [1, 4) opened with `adapters`, in steps of the given (position, count),
// and checks the concatenated outputs against ForwardNoCache.
void ExpectSessionMatchesForwardNoCache(
    v1::BlockService::Stub& stub, const node::BlockSpan& span,
    const std::map<int, BlockAdapter>& adapters, const at::Tensor& hidden,
    const std::vector<std::pair<int, int>>& steps) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub.Inference(&context);
  v1::InferenceRequest open;
  open.mutable_open()->set_model_id(kModel);
  open.mutable_open()->mutable_blocks()->set_start(1);
  open.mutable_open()->mutable_blocks()->set_end(4);
  open.mutable_open()->set_max_length(8);
  open.mutable_open()->set_session_id("adapted");
  ASSERT_TRUE(node::AdaptersToProto(adapters, open.mutable_open()->mutable_adapters()).ok());
  v1::InferenceResponse response;
  ASSERT_TRUE(stream->Write(open));
  ASSERT_TRUE(stream->Read(&response));

  std::vector<at::Tensor> outputs;
  for (const auto& [position, count] : steps) {
    v1::InferenceRequest step;
    ASSERT_TRUE(TensorToProto(hidden.narrow(1, position, count),
                              step.mutable_step()->mutable_hidden_states()).ok());
    step.mutable_step()->set_position(position);
    ASSERT_TRUE(stream->Write(step));
    ASSERT_TRUE(stream->Read(&response));
    auto output = TensorFromProto(response.hidden_states(), "output");
    ASSERT_TRUE(output.ok()) << output.status();
    outputs.push_back(*output);
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());

  at::NoGradGuard no_grad;
  auto expected = span.ForwardNoCache(hidden, 1, 4, adapters);
  ASSERT_TRUE(expected.ok()) << expected.status();
  const at::Tensor actual = at::cat(outputs, 1);
  ASSERT_EQ(actual.sizes(), expected->sizes());
  EXPECT_TRUE(at::allclose(actual, *expected, 1e-5, 1e-6))
      << "session outputs differ by "
      << (actual - *expected).abs().max().item<double>();

  // Without the adapters the outputs differ.
  auto plain = span.ForwardNoCache(hidden, 1, 4, {});
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(at::allclose(*plain, *expected, 1e-5, 1e-6));
}

TEST_F(TrainingServiceTest, InferenceWithLoraMatchesForwardNoCache) {
  std::map<int, BlockAdapter> adapters = SomeAdapters(1);
  for (auto& [block, adapter] : adapters) adapter.prompt = at::Tensor();

  // Prefill 4 tokens, then decode 2.
  ExpectSessionMatchesForwardNoCache(*stub_, *span_, adapters,
                                     at::randn({1, 6, kHidden}),
                                     {{0, 4}, {4, 1}, {5, 1}});
}

TEST_F(TrainingServiceTest, InferenceWithDeepPromptMatchesForwardNoCache) {
  std::map<int, BlockAdapter> adapters;
  adapters[2].prompt = at::randn({1, 3, kHidden});
  adapters[3].prompt = at::randn({1, 3, kHidden});

  // The 3 prompt positions span the first two steps.
  ExpectSessionMatchesForwardNoCache(*stub_, *span_, adapters,
                                     at::randn({1, 6, kHidden}),
                                     {{0, 2}, {2, 2}, {4, 1}, {5, 1}});
}

TEST_F(TrainingServiceTest, InferenceRejectsPromptLongerThanSession) {
  grpc::ClientContext context;
  auto stream = stub_->Inference(&context);
  v1::InferenceRequest open;
  open.mutable_open()->set_model_id(kModel);
  open.mutable_open()->mutable_blocks()->set_start(1);
  open.mutable_open()->mutable_blocks()->set_end(4);
  open.mutable_open()->set_max_length(4);
  open.mutable_open()->set_session_id("prompted");
  std::map<int, BlockAdapter> adapters;
  adapters[2].prompt = at::randn({1, 5, kHidden});
  ASSERT_TRUE(node::AdaptersToProto(adapters, open.mutable_open()->mutable_adapters()).ok());
  v1::InferenceResponse response;
  stream->Write(open);
  EXPECT_FALSE(stream->Read(&response));
  stream->WritesDone();
  ExpectStatus(stream->Finish(), grpc::StatusCode::INVALID_ARGUMENT,
               "block 2 prompt has shape [1, 5, ");
}

}  // namespace
}  // namespace pollen::testing
