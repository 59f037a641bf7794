// Generation with fine-tuned adapters through real nodes: every method gives
// the tokens of the in-process reference, and an adapter trained through the
// swarm by `pollen finetune` continues a training sentence.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/tokenizer.h"
#include "client/training/adapter_set.h"
#include "client/training/training_model.h"
#include "common/checkpoint.h"
#include "pollen/client.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

using client::AdapterConfig;
using client::AdapterMethod;
using client::AdapterSet;
using client::TrainingModel;

constexpr char kModelId[] = "adapters";
constexpr char kPrompt[] = "Once upon a time, there was a little";
constexpr int kNewTokens = 12;

struct AdapterCase {
  AdapterMethod method;
  bool train_head;
};

std::string CaseName(const ::testing::TestParamInfo<AdapterCase>& info) {
  std::string name = info.param.method == AdapterMethod::kPrompt
                         ? "Prompt"
                         : info.param.method == AdapterMethod::kDeepPrompt
                               ? "DeepPrompt"
                               : "Lora";
  return info.param.train_head ? name + "WithHead" : name;
}

// Keeps test names stable: gtest would print the struct's bytes, padding
// included.
void PrintTo(const AdapterCase& adapter_case, std::ostream* out) {
  *out << client::AdapterMethodName(adapter_case.method)
       << (adapter_case.train_head ? " with head" : "");
}

class AdapterGenerationTest : public ::testing::TestWithParam<AdapterCase> {
 protected:
  static void SetUpTestSuite() {
    swarm_ = new LocalSwarm();
    for (const auto& [start, end] :
         std::vector<std::pair<int, int>>{{0, 2}, {2, 4}, {4, 5}}) {
      auto index = swarm_->StartNode(Stories260kDir(), kModelId, start, end);
      ASSERT_TRUE(index.ok()) << index.status();
    }
    auto checkpoint = Checkpoint::Open(Stories260kDir());
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    auto model = TrainingModel::Load(**checkpoint, at::kCPU);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
    auto tokenizer =
        client::Tokenizer::Load(Stories260kDir() + "/tokenizer.model");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
  }

  static void TearDownTestSuite() {
    delete swarm_;
    delete model_;
    delete tokenizer_;
    swarm_ = nullptr;
    model_ = nullptr;
    tokenizer_ = nullptr;
  }

  // Writes an adapter of the case's kind to `dir` with random values large
  // enough to change the model's output: fresh LoRA B and deep prompts are
  // zero, and a prompt of three embedding rows barely moves the attention,
  // so they are filled in or scaled here.
  static void WriteRandomAdapter(const AdapterCase& adapter_case,
                                 const std::string& dir) {
    at::manual_seed(7);
    AdapterConfig config;
    config.method = adapter_case.method;
    config.prefix_length = 3;
    config.lora_rank = 4;
    config.lora_targets = {"q_proj", "v_proj", "down_proj"};
    config.train_head = adapter_case.train_head;
    auto adapters = client::InitAdapters(config, model_->config(),
                                         model_->embed_tokens(), at::kCPU);
    ASSERT_TRUE(adapters.ok()) << adapters.status();
    at::NoGradGuard no_grad;
    if (adapters->prompt.defined()) adapters->prompt.mul_(8);
    if (adapters->deep_prompt.defined()) {
      adapters->deep_prompt.normal_(0, 4);
    }
    for (auto& [block, pairs] : adapters->lora) {
      for (auto& [target, pair] : pairs) pair.b.normal_(0, 0.2);
    }
    if (config.train_head) {
      client::InitTrainableHead(model_->norm(), model_->lm_head(), &*adapters);
      adapters->norm.mul_(1.5);
      adapters->lm_head.add_(at::randn_like(adapters->lm_head) * 0.2);
    }
    ASSERT_TRUE(client::SaveAdapters(*adapters, dir).ok());
  }

  // Greedy continuation of `ids` in-process, recomputing the whole sequence
  // for each new token.
  static std::vector<int> LocalGreedy(const AdapterSet& adapters,
                                      std::vector<int> ids, int new_tokens) {
    at::NoGradGuard no_grad;
    std::vector<int> generated;
    for (int i = 0; i < new_tokens; ++i) {
      const at::Tensor input =
          at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong)
              .unsqueeze(0);
      const at::Tensor hidden = model_->RunBlocks(
          model_->EmbedWithPrompt(input, adapters), 0,
          static_cast<int>(model_->config().num_hidden_layers), adapters);
      const at::Tensor logits =
          model_->Logits(hidden.narrow(1, -1, 1), adapters);
      const int next = static_cast<int>(logits.argmax(-1).item<int64_t>());
      ids.push_back(next);
      generated.push_back(next);
    }
    return generated;
  }

  static std::unique_ptr<Client> Connect(const std::string& adapter_dir) {
    ClientOptions options;
    options.model_dir = Stories260kDir();
    options.model_id = kModelId;
    options.initial_peers = {swarm_->peer()};
    options.discovery_wait = absl::Seconds(20);
    options.adapter_dir = adapter_dir;
    auto client = Client::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  static GenerationOptions Greedy(int new_tokens) {
    GenerationOptions options;
    options.max_new_tokens = new_tokens;
    options.stop_at_eos = false;
    return options;
  }

  static LocalSwarm* swarm_;
  static TrainingModel* model_;
  static client::Tokenizer* tokenizer_;
};

LocalSwarm* AdapterGenerationTest::swarm_ = nullptr;
TrainingModel* AdapterGenerationTest::model_ = nullptr;
client::Tokenizer* AdapterGenerationTest::tokenizer_ = nullptr;

TEST_P(AdapterGenerationTest, GenerateMatchesLocal) {
  TempDir dir;
  const std::string adapter_dir = dir.path() + "/adapter";
  WriteRandomAdapter(GetParam(), adapter_dir);
  auto adapters = client::LoadAdapters(adapter_dir, model_->config(), at::kCPU);
  ASSERT_TRUE(adapters.ok()) << adapters.status();
  const std::vector<int> prompt_ids = tokenizer_->Encode(kPrompt, true);

  auto client = Connect(adapter_dir);
  ASSERT_NE(client, nullptr);
  auto result = client->GenerateFromIds(prompt_ids, Greedy(kNewTokens));
  ASSERT_TRUE(result.ok()) << result.status();

  const std::vector<int> expected =
      LocalGreedy(*adapters, prompt_ids, kNewTokens);
  EXPECT_EQ(result->new_ids, expected);

  // The adapter changes the output.
  AdapterSet plain;
  EXPECT_NE(expected, LocalGreedy(plain, prompt_ids, kNewTokens));
}

TEST_P(AdapterGenerationTest, ChatTurnsMatchLocal) {
  TempDir dir;
  const std::string adapter_dir = dir.path() + "/adapter";
  WriteRandomAdapter(GetParam(), adapter_dir);
  auto adapters = client::LoadAdapters(adapter_dir, model_->config(), at::kCPU);
  ASSERT_TRUE(adapters.ok()) << adapters.status();

  auto client = Connect(adapter_dir);
  ASSERT_NE(client, nullptr);
  auto chat = client->StartChat(64);
  ASSERT_TRUE(chat.ok()) << chat.status();
  auto first = (*chat)->Send(kPrompt, Greedy(6));
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = (*chat)->Send(" The dog", Greedy(6));
  ASSERT_TRUE(second.ok()) << second.status();

  // The same conversation in-process: the second turn follows the first
  // reply without a BOS.
  std::vector<int> history = tokenizer_->Encode(kPrompt, true);
  const std::vector<int> first_expected = LocalGreedy(*adapters, history, 6);
  EXPECT_EQ(first->new_ids, first_expected);
  history.insert(history.end(), first_expected.begin(), first_expected.end());
  const std::vector<int> turn = tokenizer_->Encode(" The dog", false);
  history.insert(history.end(), turn.begin(), turn.end());
  EXPECT_EQ(second->new_ids, LocalGreedy(*adapters, history, 6));
}

INSTANTIATE_TEST_SUITE_P(
    Methods, AdapterGenerationTest,
    ::testing::Values(AdapterCase{AdapterMethod::kPrompt, false},
                      AdapterCase{AdapterMethod::kDeepPrompt, false},
                      AdapterCase{AdapterMethod::kLora, false},
                      AdapterCase{AdapterMethod::kLora, true}),
    CaseName);

TEST_F(AdapterGenerationTest, PromptTakesPositionsFromMaxLength) {
  TempDir dir;
  const std::string adapter_dir = dir.path() + "/adapter";
  WriteRandomAdapter({AdapterMethod::kPrompt, false}, adapter_dir);
  auto client = Connect(adapter_dir);
  ASSERT_NE(client, nullptr);

  // stories260k has 512 positions; the prompt takes 3 of them.
  const std::vector<int> prompt_ids(500, 1);
  auto result = client->GenerateFromIds(prompt_ids, Greedy(10));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(result.status().message().find("the adapter's 3 prompt positions"),
            std::string::npos)
      << result.status();
  auto chat = client->StartChat(512);
  ASSERT_FALSE(chat.ok());
  EXPECT_NE(chat.status().message().find("outside 2..509"), std::string::npos)
      << chat.status();
}

TEST_F(AdapterGenerationTest, CliRejectsMissingAdapter) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "generate", "--model", Stories260kDir(), "--model-id",
       kModelId, "--initial-peers", swarm_->peer(), "--prompt", kPrompt,
       "--adapter", "/nonexistent/adapter"});
  EXPECT_NE(result.exit_code, 0);
  EXPECT_NE(result.stderr_text.find("/nonexistent/adapter/adapter_config.json"),
            std::string::npos)
      << result.stderr_text;
}

// The README's fine-tuning walk-through: train LoRA through the swarm with
// `pollen finetune`, then generate with the adapter.
TEST_F(AdapterGenerationTest, CliFinetuneThenGenerate) {
  TempDir dir;
  const std::string data = dir.path() + "/data.txt";
  std::ofstream(data)
      << "Zorblat the purple robot loved to dance in the rain.\n"
         "Zorblat the purple robot had a tiny red hat.\n"
         "Every morning Zorblat the purple robot sang to the birds.\n";
  const std::string adapter_dir = dir.path() + "/adapter";
  const std::string loss_log = dir.path() + "/loss.csv";
  const CommandResult train = RunCommand(
      {PollenBinary(), "finetune", "--model", Stories260kDir(), "--model-id",
       kModelId, "--initial-peers", swarm_->peer(), "--data", data,
       "--method", "lora", "--lora-targets",
       "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--steps",
       "60", "--batch-size", "3", "--seq-len", "32", "--lr", "0.01",
       "--seed", "1", "--output", adapter_dir, "--loss-log", loss_log},
      "", absl::Seconds(240));
  ASSERT_EQ(train.exit_code, 0) << train.stderr_text;

  // The loss log has a header and one row per step, and the loss halved.
  std::ifstream log(loss_log);
  std::vector<std::string> rows;
  for (std::string line; std::getline(log, line);) rows.push_back(line);
  ASSERT_EQ(rows.size(), 61u);
  EXPECT_EQ(rows[0], "step,loss,tokens_per_s");
  const auto loss_of = [](const std::string& row) {
    const std::vector<std::string> fields = absl::StrSplit(row, ',');
    return std::stod(fields.at(1));
  };
  EXPECT_LE(loss_of(rows.back()), 0.5 * loss_of(rows[1]));

  const CommandResult generate = RunCommand(
      {PollenBinary(), "generate", "--model", Stories260kDir(), "--model-id",
       kModelId, "--initial-peers", swarm_->peer(), "--prompt",
       "Zorblat the purple", "--max-new-tokens", "4", "--adapter",
       adapter_dir, "--json"});
  ASSERT_EQ(generate.exit_code, 0) << generate.stderr_text;
  const auto output = nlohmann::json::parse(generate.stdout_text);
  EXPECT_NE(output["text"].get<std::string>().find("robot"), std::string::npos)
      << output.dump();
}

}  // namespace
}  // namespace pollen::testing
