// Activation compression through three stories260k nodes on loopback:
// generated tokens per encoding, the encoding of the nodes' replies,
// Forward/Backward gradients, and the --compression flag.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

#include "client/swarm_client.h"
#include "client/training/adapter_set.h"
#include "client/training/remote_blocks.h"
#include "client/training/training_model.h"
#include "common/activation_compression.h"
#include "common/checkpoint.h"
#include "common/payload_chunks.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"
#include "pollen/client.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr char kModelId[] = "compression";
constexpr int kNumBlocks = 5;
constexpr int kHidden = 64;  // stories260k

class CompressionTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    swarm_ = new LocalSwarm();
    for (const auto& [start, end] :
         std::vector<std::pair<int, int>>{{0, 2}, {2, 4}, {4, 5}}) {
      auto index = swarm_->StartNode(Stories260kDir(), kModelId, start, end);
      ASSERT_TRUE(index.ok()) << index.status();
      if (start == 0) first_node_ = swarm_->node(*index).address;
    }
  }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
  }

  // Greedy ids after kStoriesPromptIds, through the swarm with `compression`,
  // relayed by the client or pushed from node to node.
  static std::vector<int> Generate(const std::string& compression,
                                   bool push = false) {
    ClientOptions options;
    options.push = push;
    options.model_dir = Stories260kDir();
    options.model_id = kModelId;
    options.initial_peers = {swarm_->peer()};
    options.discovery_wait = absl::Seconds(20);
    options.compression = compression;
    auto client = Client::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    if (!client.ok()) return {};
    GenerationOptions generation;
    generation.max_new_tokens = static_cast<int>(kStoriesReferenceIds.size());
    generation.stop_at_eos = false;
    auto result = (*client)->GenerateFromIds(kStoriesPromptIds, generation);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->new_ids : std::vector<int>{};
  }

  static std::unique_ptr<v1::BlockService::Stub> FirstNodeStub() {
    return v1::BlockService::NewStub(
        grpc::CreateChannel(first_node_, grpc::InsecureChannelCredentials()));
  }

  static v1::InferenceOpen MakeOpen(v1::Compression compression) {
    v1::InferenceOpen open;
    open.set_model_id(kModelId);
    open.mutable_blocks()->set_start(0);
    open.mutable_blocks()->set_end(2);
    open.set_max_length(16);
    open.set_session_id(absl::StrCat("raw-", static_cast<int>(compression)));
    open.set_compression(compression);
    return open;
  }

  // Sends `request` to the first node's Forward RPC and parses the reply.
  static grpc::Status Forward(const v1::ForwardRequest& request,
                              v1::ForwardResponse* response) {
    auto stub = FirstNodeStub();
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(60));
    auto stream = stub->Forward(&context);
    for (const v1::PayloadChunk& chunk : SplitMessage(request)) {
      if (!stream->Write(chunk)) break;
    }
    stream->WritesDone();
    Reassembler reassembler;
    v1::PayloadChunk chunk;
    while (!reassembler.complete() && stream->Read(&chunk)) {
      EXPECT_TRUE(reassembler.Add(chunk).ok());
    }
    const grpc::Status status = stream->Finish();
    if (status.ok()) {
      auto payload = reassembler.Take();
      EXPECT_TRUE(payload.ok()) << payload.status();
      if (payload.ok()) EXPECT_TRUE(response->ParseFromString(*payload));
    }
    return status;
  }

  static LocalSwarm* swarm_;
  static std::string first_node_;
};

LocalSwarm* CompressionTest::swarm_ = nullptr;
std::string CompressionTest::first_node_;

TEST_F(CompressionTest, HalfPrecisionKeepsReferenceTokens) {
  EXPECT_EQ(Generate("none"), kStoriesReferenceIds);
  EXPECT_EQ(Generate("fp16"), kStoriesReferenceIds);
  EXPECT_EQ(Generate("bf16"), kStoriesReferenceIds);
}

TEST_F(CompressionTest, PushedStepsKeepReferenceTokens) {
  EXPECT_EQ(Generate("bf16", /*push=*/true), kStoriesReferenceIds);
  EXPECT_EQ(Generate("int8", /*push=*/true), kStoriesReferenceIds);
}

TEST_F(CompressionTest, Int8KeepsReferenceTokens) {
  const std::vector<int> ids = Generate("int8");
  ASSERT_EQ(ids.size(), kStoriesReferenceIds.size());
  const auto first_difference =
      std::mismatch(ids.begin(), ids.end(), kStoriesReferenceIds.begin());
  const int agreeing_prefix =
      static_cast<int>(first_difference.first - ids.begin());
  EXPECT_EQ(ids, kStoriesReferenceIds)
      << "the first " << agreeing_prefix << " of " << ids.size()
      << " tokens match";
}

TEST_F(CompressionTest, InferenceRepliesInSessionEncoding) {
  for (const v1::Compression compression :
       {v1::COMPRESSION_FLOAT16, v1::COMPRESSION_BFLOAT16,
        v1::COMPRESSION_INT8_BLOCKWISE}) {
    SCOPED_TRACE(CompressionName(compression));
    auto stub = FirstNodeStub();
    grpc::ClientContext context;
    auto stream = stub->Inference(&context);

    v1::InferenceRequest request;
    *request.mutable_open() = MakeOpen(compression);
    ASSERT_TRUE(stream->Write(request));
    v1::InferenceResponse response;
    ASSERT_TRUE(stream->Read(&response));

    request.Clear();
    v1::InferenceStep* step = request.mutable_step();
    ASSERT_TRUE(TensorToProto(at::randn({1, 3, kHidden}),
                              step->mutable_hidden_states(), compression)
                    .ok());
    ASSERT_TRUE(stream->Write(request));
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_EQ(response.position(), 3u);
    EXPECT_EQ(response.hidden_states().compression(), compression);
    EXPECT_EQ(response.hidden_states().dtype(), v1::DTYPE_FLOAT32);
    auto output = TensorFromProto(response.hidden_states(), "output");
    ASSERT_TRUE(output.ok()) << output.status();
    EXPECT_EQ(output->sizes(), at::IntArrayRef({1, 3, kHidden}));

    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }
}

TEST_F(CompressionTest, ForwardRepliesInRequestedEncoding) {
  v1::ForwardRequest request;
  request.set_model_id(kModelId);
  request.mutable_blocks()->set_start(0);
  request.mutable_blocks()->set_end(2);
  request.set_compression(v1::COMPRESSION_INT8_BLOCKWISE);
  ASSERT_TRUE(TensorToProto(at::randn({2, 5, kHidden}),
                            request.mutable_hidden_states(),
                            v1::COMPRESSION_BFLOAT16)
                  .ok());
  v1::ForwardResponse response;
  const grpc::Status status = Forward(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.hidden_states().compression(),
            v1::COMPRESSION_INT8_BLOCKWISE);
  // 640 elements: 10 scales of 4 bytes and 640 int8 values.
  EXPECT_EQ(response.hidden_states().data().size(), 680u);
}

TEST_F(CompressionTest, NodeRejectsUnknownCompression) {
  // An Inference session.
  {
    auto stub = FirstNodeStub();
    grpc::ClientContext context;
    auto stream = stub->Inference(&context);
    v1::InferenceRequest request;
    *request.mutable_open() = MakeOpen(static_cast<v1::Compression>(99));
    ASSERT_TRUE(stream->Write(request));
    v1::InferenceResponse response;
    EXPECT_FALSE(stream->Read(&response));
    const grpc::Status status = stream->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find("unknown compression 99"),
              std::string::npos)
        << status.error_message();
  }

  // A Forward call, both for the reply and for the sent hidden states.
  for (const bool in_hidden_states : {false, true}) {
    SCOPED_TRACE(in_hidden_states ? "hidden_states" : "request");
    v1::ForwardRequest request;
    request.set_model_id(kModelId);
    request.mutable_blocks()->set_start(0);
    request.mutable_blocks()->set_end(2);
    ASSERT_TRUE(TensorToProto(at::randn({1, 2, kHidden}),
                              request.mutable_hidden_states())
                    .ok());
    if (in_hidden_states) {
      request.mutable_hidden_states()->set_compression(
          static_cast<v1::Compression>(99));
    } else {
      request.set_compression(static_cast<v1::Compression>(99));
    }
    v1::ForwardResponse response;
    const grpc::Status status = Forward(request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find("unknown compression 99"),
              std::string::npos)
        << status.error_message();
  }
}

// Forward and Backward through the swarm with each encoding, compared with
// the uncompressed passes: outputs, input gradients and LoRA gradients.
TEST_F(CompressionTest, GradientsCloseToUncompressed) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto model = client::TrainingModel::Load(**checkpoint, at::kCPU,
                                           /*load_blocks=*/false);
  ASSERT_TRUE(model.ok()) << model.status();
  auto swarm = client::SwarmClient::Connect({swarm_->peer()});
  ASSERT_TRUE(swarm.ok()) << swarm.status();

  client::AdapterConfig config;
  config.method = client::AdapterMethod::kLora;
  config.lora_rank = 4;
  config.lora_targets = {"q_proj", "v_proj", "down_proj"};
  at::manual_seed(7);
  auto adapters = client::InitAdapters(config, (*model)->config(),
                                       (*model)->embed_tokens(), at::kCPU);
  ASSERT_TRUE(adapters.ok()) << adapters.status();
  {
    at::NoGradGuard no_grad;
    for (const at::Tensor& parameter : adapters->Parameters()) {
      parameter.add_(at::randn_like(parameter) * 0.05);
    }
  }
  const at::Tensor ids =
      at::tensor(std::vector<int64_t>{1, 403, 407, 261, 378, 259, 1, 365, 287,
                                      474, 334, 267},
                 at::kLong)
          .view({2, 6});
  const at::Tensor hidden =
      (*model)->EmbedWithPrompt(ids, *adapters).detach();
  const at::Tensor grad_outputs = at::randn(hidden.sizes());

  // Outputs and gradients of one pass with `compression`.
  struct Pass {
    at::Tensor outputs;
    client::RemoteBlocks::Gradients gradients;
  };
  auto run = [&](v1::Compression compression) -> absl::StatusOr<Pass> {
    client::RemoteBlocksOptions options;
    options.model_id = kModelId;
    options.num_blocks = kNumBlocks;
    options.discovery_wait = absl::Seconds(10);
    options.call_timeout = absl::Seconds(30);
    options.compression = compression;
    client::RemoteBlocks remote(**swarm, options);
    std::vector<client::RemoteBlocks::HopInput> hop_inputs;
    Pass pass;
    POLLEN_ASSIGN_OR_RETURN(
        pass.outputs,
        remote.ForwardPass(hidden, *adapters, 0, -1, &hop_inputs));
    POLLEN_ASSIGN_OR_RETURN(
        pass.gradients,
        remote.BackwardPass(hop_inputs, *adapters, grad_outputs));
    return pass;
  };
  auto relative_error = [](const at::Tensor& actual,
                           const at::Tensor& expected) {
    return (actual - expected).norm().item<double>() /
           expected.norm().item<double>();
  };

  auto reference = run(v1::COMPRESSION_NONE);
  ASSERT_TRUE(reference.ok()) << reference.status();
  // Relative norm of the difference, about 3x the largest error measured
  // over the outputs, the input gradient and every LoRA gradient (1.3e-3,
  // 9.3e-3 and 5.0e-2). Every hop encodes its input, output and gradients,
  // so the errors add up over the three hops.
  const struct {
    v1::Compression compression;
    double tolerance;
  } cases[] = {{v1::COMPRESSION_FLOAT16, 5e-3},
               {v1::COMPRESSION_BFLOAT16, 3e-2},
               {v1::COMPRESSION_INT8_BLOCKWISE, 1.5e-1}};
  for (const auto& [compression, tolerance] : cases) {
    SCOPED_TRACE(CompressionName(compression));
    auto pass = run(compression);
    ASSERT_TRUE(pass.ok()) << pass.status();

    const double outputs_error =
        relative_error(pass->outputs, reference->outputs);
    const double grad_inputs_error = relative_error(
        pass->gradients.grad_inputs, reference->gradients.grad_inputs);
    std::cout << CompressionName(compression)
              << ": relative error of outputs " << outputs_error
              << ", of input gradients " << grad_inputs_error;
    EXPECT_LE(outputs_error, tolerance);
    EXPECT_LE(grad_inputs_error, tolerance);

    const auto& expected = reference->gradients.grad_parameters;
    const auto& actual = pass->gradients.grad_parameters;
    ASSERT_EQ(actual.size(), expected.size());
    double worst = 0;
    for (size_t i = 0; i < expected.size(); ++i) {
      const double error = relative_error(actual[i], expected[i]);
      worst = std::max(worst, error);
      EXPECT_LE(error, tolerance) << "LoRA gradient " << i << " of shape "
                                  << expected[i].sizes();
    }
    std::cout << ", worst LoRA gradient " << worst << "\n";
  }
}

TEST_F(CompressionTest, GenerateFlagSelectsEncoding) {
  const std::vector<std::string> base = {
      PollenBinary(),     "generate",     "--model",
      Stories260kDir(),   "--model-id",   kModelId,
      "--initial-peers",  swarm_->peer(), "--prompt",
      kStoriesPrompt,     "--max-new-tokens", "48",
      "--temperature",    "0",            "--json"};

  std::vector<std::string> argv = base;
  argv.insert(argv.end(), {"--compression", "bf16"});
  const CommandResult result = RunCommand(argv);
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);
  EXPECT_EQ(output["new_ids"].get<std::vector<int>>(), kStoriesReferenceIds);

  argv = base;
  argv.insert(argv.end(), {"--compression", "zip"});
  const CommandResult rejected = RunCommand(argv);
  EXPECT_EQ(rejected.exit_code, 2);
  EXPECT_NE(rejected.stderr_text.find("unknown compression 'zip'"),
            std::string::npos)
      << rejected.stderr_text;
  EXPECT_NE(rejected.stderr_text.find("none, fp16 (float16), bf16"),
            std::string::npos)
      << rejected.stderr_text;
}

TEST_F(CompressionTest, FinetuneFlagTrainsWithInt8) {
  TempDir dir;
  const std::string data = dir.path() + "/data.txt";
  std::ofstream(data) << "Zorblat the purple robot loved to dance.\n"
                         "Zorblat the purple robot had a tiny red hat.\n";
  const std::string loss_log = dir.path() + "/loss.csv";
  const CommandResult train = RunCommand(
      {PollenBinary(), "finetune", "--model", Stories260kDir(), "--model-id",
       kModelId, "--initial-peers", swarm_->peer(), "--data", data,
       "--method", "lora", "--steps", "4", "--batch-size", "2", "--seq-len",
       "16", "--seed", "1", "--output", dir.path() + "/adapter",
       "--loss-log", loss_log, "--compression", "int8"},
      "", absl::Seconds(120));
  ASSERT_EQ(train.exit_code, 0) << train.stderr_text;
  EXPECT_TRUE(std::filesystem::exists(dir.path() +
                                      "/adapter/adapter_model.safetensors"));

  // A header and one finite loss per step.
  std::ifstream log(loss_log);
  std::vector<std::string> rows;
  for (std::string line; std::getline(log, line);) rows.push_back(line);
  ASSERT_EQ(rows.size(), 5u);
  for (size_t i = 1; i < rows.size(); ++i) {
    const double loss = std::stod(rows[i].substr(rows[i].find(',') + 1));
    EXPECT_TRUE(std::isfinite(loss)) << rows[i];
  }
}

}  // namespace
}  // namespace pollen::testing
