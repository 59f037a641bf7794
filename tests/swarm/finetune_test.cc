// Fine-tuning through a loopback swarm: gradients and losses match the
// in-process reference, and training survives killed nodes.
#include <signal.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "client/swarm_client.h"
#include "client/training/adapter_set.h"
#include "client/training/remote_blocks.h"
#include "client/training/trainer.h"
#include "client/training/training_model.h"
#include "common/checkpoint.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

using client::AdapterMethod;
using client::AdapterSet;
using client::RemoteBlocks;
using client::TrainingModel;

constexpr char kModelId[] = "finetune";
constexpr int kNumBlocks = 5;

class FinetuneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    StartNode(0, 2);
    StartNode(2, 4);
    StartNode(4, 5);
    auto checkpoint = Checkpoint::Open(Stories260kDir());
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    auto model = TrainingModel::Load(**checkpoint, at::kCPU);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto swarm = client::SwarmClient::Connect({swarm_.peer()});
    ASSERT_TRUE(swarm.ok()) << swarm.status();
    swarm_client_ = std::move(*swarm);
    client::RemoteBlocksOptions options;
    options.model_id = kModelId;
    options.num_blocks = kNumBlocks;
    options.discovery_wait = absl::Seconds(10);
    options.call_timeout = absl::Seconds(20);
    remote_ = std::make_unique<RemoteBlocks>(*swarm_client_, options);
  }

  int StartNode(int start, int end) {
    auto index = swarm_.StartNode(Stories260kDir(), kModelId, start, end);
    EXPECT_TRUE(index.ok()) << index.status();
    if (!index.ok()) return -1;
    spans_[*index] = {start, end};
    return *index;
  }

  // Kills the node at `address` and returns whether one was found.
  bool KillNodeAt(const std::string& address) {
    for (const auto& [index, span] : spans_) {
      NodeHandle& node = swarm_.node(index);
      if (node.address != address || !node.process.IsRunning()) continue;
      node.process.Signal(SIGKILL);
      node.process.Wait(absl::Seconds(5));
      return true;
    }
    return false;
  }

  AdapterSet MakeAdapters(AdapterMethod method) {
    client::AdapterConfig config;
    config.method = method;
    config.prefix_length = 3;
    config.lora_rank = 4;
    config.lora_targets = {"q_proj", "k_proj", "v_proj", "o_proj",
                           "gate_proj", "up_proj", "down_proj"};
    at::manual_seed(11);
    auto adapters = client::InitAdapters(config, model_->config(),
                                         model_->embed_tokens(), at::kCPU);
    EXPECT_TRUE(adapters.ok()) << adapters.status();
    at::NoGradGuard no_grad;
    for (const at::Tensor& parameter : adapters->Parameters()) {
      parameter.add_(at::randn_like(parameter) * 0.05);
    }
    return std::move(*adapters);
  }

  // Loss of a fixed batch of two sequences; `remote` selects the swarm.
  at::Tensor Loss(const AdapterSet& adapters, bool remote) {
    const at::Tensor ids =
        at::tensor(std::vector<int64_t>{1, 403, 407, 261, 378, 259, 1, 365,
                                        287, 474, 334, 267},
                   at::kLong)
            .view({2, 6});
    const at::Tensor mask = at::ones_like(ids);
    const at::Tensor input = model_->EmbedWithPrompt(ids, adapters);
    const at::Tensor output =
        remote ? remote_->Run(input, adapters)
               : model_->RunBlocks(input, 0, kNumBlocks, adapters);
    return TrainingModel::Loss(model_->Logits(output), ids, mask,
                               adapters.PrefixLength());
  }

  // Gradients of the loss with respect to every adapter tensor.
  std::vector<at::Tensor> Gradients(const AdapterSet& adapters, bool remote) {
    for (const at::Tensor& parameter : adapters.Parameters()) {
      if (parameter.grad().defined()) parameter.mutable_grad().zero_();
    }
    Loss(adapters, remote).backward();
    std::vector<at::Tensor> grads;
    for (const at::Tensor& parameter : adapters.Parameters()) {
      grads.push_back(parameter.grad().clone());
    }
    return grads;
  }

  // Compares the whole gradient vector within `tolerance` relative (the
  // norm of the difference over the norm of `expected`), and each tensor
  // within 10x that: a small tensor's float32 rounding in a different
  // summation order can reach 1e-5 of its own norm.
  void ExpectSameGradients(const std::vector<at::Tensor>& expected,
                           const std::vector<at::Tensor>& actual,
                           double tolerance) {
    ASSERT_EQ(expected.size(), actual.size());
    double total_error = 0;
    double total_scale = 0;
    for (size_t i = 0; i < expected.size(); ++i) {
      const double error = (actual[i] - expected[i]).norm().item<double>();
      const double scale = expected[i].norm().item<double>();
      EXPECT_LE(error, 10 * tolerance * scale)
          << "tensor " << i << " of shape " << expected[i].sizes();
      total_error += error * error;
      total_scale += scale * scale;
    }
    EXPECT_LE(std::sqrt(total_error), tolerance * std::sqrt(total_scale))
        << "all " << expected.size() << " gradient tensors";
  }

  void CheckGradients(AdapterMethod method) {
    const AdapterSet adapters = MakeAdapters(method);
    const std::vector<at::Tensor> local = Gradients(adapters, false);
    const std::vector<at::Tensor> remote = Gradients(adapters, true);
    ExpectSameGradients(local, remote, 1e-5);
  }

  LocalSwarm swarm_;
  std::map<int, std::pair<int, int>> spans_;
  std::unique_ptr<TrainingModel> model_;
  std::unique_ptr<client::SwarmClient> swarm_client_;
  std::unique_ptr<RemoteBlocks> remote_;
};

TEST_F(FinetuneTest, PromptGradientsMatchLocal) {
  CheckGradients(AdapterMethod::kPrompt);
}

TEST_F(FinetuneTest, DeepPromptGradientsMatchLocal) {
  CheckGradients(AdapterMethod::kDeepPrompt);
}

TEST_F(FinetuneTest, LoraGradientsMatchLocal) {
  CheckGradients(AdapterMethod::kLora);
}

TEST_F(FinetuneTest, LossLogMatchesLocal) {
  TempDir dir;
  const std::string data = dir.path() + "/data.txt";
  std::ofstream(data) << "Zorblat the purple robot loved to dance.\n"
                         "Zorblat the purple robot had a tiny red hat.\n";
  client::FinetuneOptions options;
  options.model_dir = Stories260kDir();
  options.data_path = data;
  options.adapter.method = AdapterMethod::kLora;
  options.steps = 3;
  options.batch_size = 2;
  options.seq_len = 16;
  options.learning_rate = 1e-2;
  options.seed = 5;
  options.model_id = kModelId;
  options.initial_peers = {swarm_.peer()};
  options.discovery_wait = absl::Seconds(10);

  options.local = true;
  options.output_dir = dir.path() + "/local";
  options.loss_log_path = dir.path() + "/local.csv";
  ASSERT_TRUE(client::RunFinetune(options).ok());
  options.local = false;
  options.output_dir = dir.path() + "/swarm";
  options.loss_log_path = dir.path() + "/swarm.csv";
  auto result = client::RunFinetune(options);
  ASSERT_TRUE(result.ok()) << result.status();

  std::ifstream local_log(dir.path() + "/local.csv");
  std::ifstream swarm_log(dir.path() + "/swarm.csv");
  std::string local_line;
  std::string swarm_line;
  std::getline(local_log, local_line);
  std::getline(swarm_log, swarm_line);
  EXPECT_EQ(swarm_line, "step,loss,tokens_per_s");
  for (int step = 1; step <= options.steps; ++step) {
    ASSERT_TRUE(std::getline(local_log, local_line));
    ASSERT_TRUE(std::getline(swarm_log, swarm_line));
    const double local_loss = std::stod(local_line.substr(local_line.find(',') + 1));
    const double swarm_loss = std::stod(swarm_line.substr(swarm_line.find(',') + 1));
    EXPECT_NEAR(swarm_loss, local_loss, 1e-4 * local_loss) << "step " << step;
  }
}

TEST_F(FinetuneTest, KillBetweenSteps) {
  StartNode(2, 4);
  const AdapterSet adapters = MakeAdapters(AdapterMethod::kLora);
  const std::vector<at::Tensor> expected = Gradients(adapters, false);
  Gradients(adapters, true);

  // Kill the node that served blocks 2:4; its replica takes over.
  std::string address;
  for (const auto& hop : remote_->last_route()) {
    if (hop.start == 2) address = hop.server.address;
  }
  ASSERT_TRUE(KillNodeAt(address)) << address;
  ExpectSameGradients(expected, Gradients(adapters, true), 1e-5);
}

TEST_F(FinetuneTest, KillDuringBackward) {
  StartNode(2, 4);
  const AdapterSet adapters = MakeAdapters(AdapterMethod::kDeepPrompt);
  const std::vector<at::Tensor> expected = Gradients(adapters, false);
  for (const at::Tensor& parameter : adapters.Parameters()) {
    parameter.mutable_grad().zero_();
  }

  // Forward through the swarm, kill the node of blocks 2:4, then backward.
  const at::Tensor loss = Loss(adapters, true);
  std::string address;
  for (const auto& hop : remote_->last_route()) {
    if (hop.start == 2) address = hop.server.address;
  }
  ASSERT_TRUE(KillNodeAt(address)) << address;
  loss.backward();
  EXPECT_GE(remote_->failovers(), 1);
  std::vector<at::Tensor> actual;
  for (const at::Tensor& parameter : adapters.Parameters()) {
    actual.push_back(parameter.grad());
  }
  ExpectSameGradients(expected, actual, 1e-5);
}

}  // namespace
}  // namespace pollen::testing
