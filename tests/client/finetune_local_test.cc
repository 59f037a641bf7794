// In-process fine-tuning: adapter files, training data, gradients and the
// training loop on stories260k.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "client/model_head.h"
#include "client/tokenizer.h"
#include "client/training/adapter_set.h"
#include "client/training/trainer.h"
#include "client/training/training_data.h"
#include "client/training/training_model.h"
#include "common/checkpoint.h"
#include "common/safetensors.h"
#include "node/block_span.h"
#include "tests/support/test_support.h"

namespace pollen::client {
namespace {

using ::pollen::testing::kStoriesPromptIds;
using ::pollen::testing::Stories260kDir;
using ::pollen::testing::TempDir;

// Sentences with a made-up name that stories260k has never seen.
constexpr char kMemorisationData[] =
    "Zorblat the purple robot loved to dance in the rain.\n"
    "Zorblat the purple robot had a tiny red hat.\n"
    "Every morning Zorblat the purple robot sang to the birds.\n";

std::string WriteFile(const std::string& dir, const std::string& name,
                      const std::string& text) {
  const std::string path = (std::filesystem::path(dir) / name).string();
  std::ofstream(path) << text;
  return path;
}

std::unique_ptr<TrainingModel> LoadModel() {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto model = TrainingModel::Load(**checkpoint, at::kCPU);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

AdapterSet MakeAdapters(const TrainingModel& model, AdapterMethod method) {
  AdapterConfig config;
  config.method = method;
  config.prefix_length = 3;
  config.lora_rank = 4;
  config.lora_targets = {"q_proj", "v_proj", "o_proj", "down_proj"};
  at::manual_seed(7);
  auto adapters =
      InitAdapters(config, model.config(), model.embed_tokens(), at::kCPU);
  EXPECT_TRUE(adapters.ok()) << adapters.status();

  // Move every tensor off its initial value so that B != 0 and deep prompts
  // are not zero, which would hide gradient errors.
  at::NoGradGuard no_grad;
  for (const at::Tensor& parameter : adapters->Parameters()) {
    parameter.add_(at::randn_like(parameter) * 0.05);
  }
  return std::move(*adapters);
}

at::Tensor PromptIds() {
  return at::tensor(std::vector<int64_t>(kStoriesPromptIds.begin(),
                                         kStoriesPromptIds.end()),
                    at::kLong)
      .unsqueeze(0);
}

TEST(TrainingModel, MatchesBlockSpan) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  const int blocks = static_cast<int>(model->config().num_hidden_layers);
  auto span = node::BlockSpan::Load(**checkpoint, 0, blocks, at::kFloat,
                                    at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();

  const at::Tensor ids = PromptIds();
  const at::Tensor hidden = at::embedding(model->embed_tokens(), ids);
  std::vector<node::LayerKvCache> cache =
      (*span)->AllocateCache(0, blocks, 1, ids.size(1));
  auto expected = (*span)->Forward(hidden, cache, 0, 0, blocks);
  ASSERT_TRUE(expected.ok()) << expected.status();

  const at::Tensor actual = model->RunBlocks(hidden, 0, blocks, AdapterSet());
  EXPECT_TRUE(at::allclose(actual, *expected, 1e-4, 1e-5))
      << (actual - *expected).abs().max().item<float>();
}

TEST(AdapterFiles, LoraRoundTrip) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  AdapterSet adapters = MakeAdapters(*model, AdapterMethod::kLora);
  adapters.config.base_model = "stories260k";
  TempDir dir;
  ASSERT_TRUE(SaveAdapters(adapters, dir.path()).ok());

  // PEFT names and config fields.
  auto file = SafetensorsFile::Open(dir.path() + "/adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_NE((*file)->Find("base_model.model.model.layers.0.self_attn.q_proj"
                          ".lora_A.weight"),
            nullptr);
  EXPECT_NE((*file)->Find("base_model.model.model.layers.4.mlp.down_proj"
                          ".lora_B.weight"),
            nullptr);
  std::ifstream config_file(dir.path() + "/adapter_config.json");
  const nlohmann::json config = nlohmann::json::parse(config_file);
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["r"], 4);
  EXPECT_EQ(config["lora_alpha"], 16.0);
  EXPECT_EQ(config["base_model_name_or_path"], "stories260k");
  EXPECT_EQ(config["target_modules"].size(), 4u);

  // Loading gives back the same tensors.
  auto loaded = LoadAdapters(dir.path(), model->config(), at::kCPU);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const std::vector<at::Tensor> before = adapters.Parameters();
  const std::vector<at::Tensor> after = loaded->Parameters();
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(at::equal(before[i].detach(), after[i].detach())) << i;
  }
}

TEST(AdapterFiles, DeepPromptRoundTrip) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  AdapterSet adapters = MakeAdapters(*model, AdapterMethod::kDeepPrompt);
  TempDir dir;
  ASSERT_TRUE(SaveAdapters(adapters, dir.path()).ok());
  auto loaded = LoadAdapters(dir.path(), model->config(), at::kCPU);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->config.method, AdapterMethod::kDeepPrompt);
  EXPECT_TRUE(at::equal(loaded->prompt.detach(), adapters.prompt.detach()));
  EXPECT_TRUE(
      at::equal(loaded->deep_prompt.detach(), adapters.deep_prompt.detach()));
}

TEST(AdapterFiles, HeadRoundTrip) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  AdapterSet adapters = MakeAdapters(*model, AdapterMethod::kPrompt);
  adapters.config.train_head = true;
  InitTrainableHead(model->norm(), model->lm_head(), &adapters);
  TempDir dir;
  ASSERT_TRUE(SaveAdapters(adapters, dir.path()).ok());

  // PEFT's modules_to_save names.
  auto file = SafetensorsFile::Open(dir.path() + "/adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_NE((*file)->Find("base_model.model.model.norm.weight"), nullptr);
  EXPECT_NE((*file)->Find("base_model.model.lm_head.weight"), nullptr);
  std::ifstream config_file(dir.path() + "/adapter_config.json");
  const nlohmann::json config = nlohmann::json::parse(config_file);
  EXPECT_EQ(config["modules_to_save"], nlohmann::json({"lm_head", "norm"}));

  auto loaded = LoadAdapters(dir.path(), model->config(), at::kCPU);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(loaded->config.train_head);
  EXPECT_TRUE(at::equal(loaded->norm.detach(), model->norm()));
  EXPECT_TRUE(at::equal(loaded->lm_head.detach(), model->lm_head()));
  EXPECT_TRUE(loaded->lm_head.requires_grad());
}

TEST(AdapterFiles, RejectsPartialHead) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  TempDir dir;
  ASSERT_TRUE(
      SaveAdapters(MakeAdapters(*model, AdapterMethod::kPrompt), dir.path())
          .ok());
  const std::string config_path = dir.path() + "/adapter_config.json";
  nlohmann::json config = nlohmann::json::parse(std::ifstream(config_path));
  config["modules_to_save"] = {"lm_head"};
  std::ofstream(config_path) << config.dump();
  auto loaded = LoadAdapters(dir.path(), model->config(), at::kCPU);
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(loaded.status().message().find("modules_to_save is [lm_head]"),
            std::string::npos)
      << loaded.status();
}

TEST(AdapterFiles, MissingFolder) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  auto loaded = LoadAdapters("/nonexistent/adapter", model->config(), at::kCPU);
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kNotFound);
}

TEST(TrainingData, ReadsTxtAndJsonl) {
  TempDir dir;
  auto txt = ReadTrainingExamples(WriteFile(dir.path(), "a.txt", "one\n\ntwo\n"));
  ASSERT_TRUE(txt.ok()) << txt.status();
  EXPECT_EQ(*txt, (std::vector<std::string>{"one", "two"}));
  auto jsonl = ReadTrainingExamples(WriteFile(
      dir.path(), "a.jsonl", "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n"));
  ASSERT_TRUE(jsonl.ok()) << jsonl.status();
  EXPECT_EQ(*jsonl, (std::vector<std::string>{"one", "two"}));
}

TEST(TrainingData, MalformedFiles) {
  TempDir dir;
  const auto missing = ReadTrainingExamples(dir.path() + "/none.txt");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  const auto empty = ReadTrainingExamples(WriteFile(dir.path(), "e.txt", "\n\n"));
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  const auto bad_json = ReadTrainingExamples(
      WriteFile(dir.path(), "b.jsonl", "{\"text\": \"ok\"}\n{\"text\": \n"));
  EXPECT_EQ(bad_json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_json.status().message().find("b.jsonl:2"), std::string::npos)
      << bad_json.status();
  const auto no_text = ReadTrainingExamples(
      WriteFile(dir.path(), "c.jsonl", "{\"prompt\": \"ok\"}\n"));
  EXPECT_EQ(no_text.status().code(), absl::StatusCode::kInvalidArgument);
  const auto csv = ReadTrainingExamples(WriteFile(dir.path(), "d.csv", "a\n"));
  EXPECT_EQ(csv.status().code(), absl::StatusCode::kInvalidArgument);
}

// Autograd's gradient against central differences on a few coordinates of
// every trainable tensor.
void CheckFiniteDifferences(AdapterMethod method) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  AdapterSet adapters = MakeAdapters(*model, method);
  const at::Tensor ids = PromptIds();
  const at::Tensor mask = at::ones_like(ids);

  const at::Tensor loss = model->ComputeLoss(ids, mask, adapters);
  loss.backward();
  constexpr double kStep = 1e-2;
  for (const at::Tensor& parameter : adapters.Parameters()) {
    ASSERT_TRUE(parameter.grad().defined());
    const at::Tensor flat_grad = parameter.grad().reshape({-1});
    const int64_t size = flat_grad.numel();
    // The largest gradient entry plus two fixed ones.
    for (int64_t index : {flat_grad.abs().argmax().item<int64_t>(),
                          int64_t{0}, size / 2}) {
      at::NoGradGuard no_grad;
      at::Tensor flat = parameter.view({-1});
      const float original = flat[index].item<float>();
      flat[index].fill_(original + kStep);
      const double plus = model->ComputeLoss(ids, mask, adapters).item<double>();
      flat[index].fill_(original - kStep);
      const double minus = model->ComputeLoss(ids, mask, adapters).item<double>();
      flat[index].fill_(original);
      const double numeric = (plus - minus) / (2 * kStep);
      const double analytic = flat_grad[index].item<double>();
      EXPECT_NEAR(analytic, numeric, 2e-3 + 2e-2 * std::abs(numeric))
          << AdapterMethodName(method) << " tensor of shape "
          << parameter.sizes() << " index " << index;
    }
  }
}

TEST(Gradients, PromptFiniteDifferences) {
  CheckFiniteDifferences(AdapterMethod::kPrompt);
}

TEST(Gradients, DeepPromptFiniteDifferences) {
  CheckFiniteDifferences(AdapterMethod::kDeepPrompt);
}

TEST(Gradients, LoraFiniteDifferences) {
  CheckFiniteDifferences(AdapterMethod::kLora);
}

std::vector<std::string> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

FinetuneOptions MemorisationOptions(const TempDir& dir, AdapterMethod method) {
  FinetuneOptions options;
  options.model_dir = Stories260kDir();
  options.data_path = WriteFile(dir.path(), "data.txt", kMemorisationData);
  options.adapter.method = method;
  options.adapter.prefix_length = 16;
  options.adapter.lora_rank = 8;
  options.adapter.lora_targets = {"q_proj", "k_proj", "v_proj", "o_proj",
                                  "gate_proj", "up_proj", "down_proj"};
  // Prompts have few parameters, so they need more steps than LoRA.
  options.steps = method == AdapterMethod::kLora ? 60 : 200;
  options.batch_size = 3;
  options.seq_len = 32;
  options.learning_rate = method == AdapterMethod::kLora ? 1e-2 : 3e-2;
  options.output_dir = dir.path() + "/adapter";
  options.seed = 1;
  options.local = true;
  options.loss_log_path = dir.path() + "/loss.csv";
  return options;
}

// Greedy continuation under the adapter, recomputing the whole sequence for
// each new token.
std::string GreedyContinue(const TrainingModel& model,
                           const Tokenizer& tokenizer,
                           const AdapterSet& adapters,
                           const std::string& prompt, int new_tokens) {
  at::NoGradGuard no_grad;
  std::vector<int> ids = tokenizer.Encode(prompt, /*add_bos=*/true);
  const size_t prompt_length = ids.size();
  for (int i = 0; i < new_tokens; ++i) {
    const at::Tensor input =
        at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong)
            .unsqueeze(0);
    const at::Tensor hidden = model.RunBlocks(
        model.EmbedWithPrompt(input, adapters), 0,
        static_cast<int>(model.config().num_hidden_layers), adapters);
    const at::Tensor logits = model.Logits(hidden.narrow(1, -1, 1));
    ids.push_back(static_cast<int>(logits.argmax(-1).item<int64_t>()));
  }
  return tokenizer.Decode(
      std::vector<int>(ids.begin() + prompt_length, ids.end()));
}

void CheckMemorisation(AdapterMethod method) {
  TempDir dir;
  const FinetuneOptions options = MemorisationOptions(dir, method);
  auto result = RunFinetune(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->steps_done, options.steps);
  EXPECT_LE(result->last_loss, 0.5 * result->first_loss)
      << AdapterMethodName(method) << " first " << result->first_loss;

  // The saved adapter continues a training prompt with the taught words.
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  auto tokenizer = Tokenizer::Load(Stories260kDir() + "/tokenizer.model");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto adapters = LoadAdapters(options.output_dir, model->config(), at::kCPU);
  ASSERT_TRUE(adapters.ok()) << adapters.status();
  const std::string text = GreedyContinue(*model, **tokenizer, *adapters,
                                          "Zorblat the purple", 4);
  EXPECT_NE(text.find("robot"), std::string::npos)
      << AdapterMethodName(method) << " continued with '" << text
      << "', final loss " << result->last_loss;
}

TEST(Finetune, PromptMemorises) { CheckMemorisation(AdapterMethod::kPrompt); }

TEST(Finetune, DeepPromptMemorises) {
  CheckMemorisation(AdapterMethod::kDeepPrompt);
}

TEST(Finetune, LoraMemorises) { CheckMemorisation(AdapterMethod::kLora); }

TEST(Finetune, TrainsHeadWithPrompt) {
  TempDir dir;
  FinetuneOptions options = MemorisationOptions(dir, AdapterMethod::kPrompt);
  options.adapter.train_head = true;
  options.steps = 20;
  auto result = RunFinetune(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_LT(result->last_loss, result->first_loss);

  // The saved head moved away from the checkpoint's.
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  auto adapters = LoadAdapters(options.output_dir, model->config(), at::kCPU);
  ASSERT_TRUE(adapters.ok()) << adapters.status();
  ASSERT_TRUE(adapters->lm_head.defined());
  EXPECT_FALSE(at::equal(adapters->lm_head.detach(), model->lm_head()));
  EXPECT_FALSE(at::equal(adapters->norm.detach(), model->norm()));
}

TEST(Finetune, LossLogAndResume) {
  TempDir dir;
  FinetuneOptions options = MemorisationOptions(dir, AdapterMethod::kLora);
  options.steps = 4;
  ASSERT_TRUE(RunFinetune(options).ok());
  std::vector<std::string> lines = ReadLines(options.loss_log_path);
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_EQ(lines[0], "step,loss,tokens_per_s");
  EXPECT_EQ(lines[4].rfind("4,", 0), 0u) << lines[4];

  // Resuming continues at step 5 and appends to the log.
  options.steps = 6;
  options.resume = true;
  auto resumed = RunFinetune(options);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed->steps_done, 6);
  lines = ReadLines(options.loss_log_path);
  ASSERT_EQ(lines.size(), 7u);
  EXPECT_EQ(lines[5].rfind("5,", 0), 0u) << lines[5];
}

TEST(Finetune, SameSeedSameLosses) {
  TempDir first_dir;
  TempDir second_dir;
  FinetuneOptions first = MemorisationOptions(first_dir, AdapterMethod::kPrompt);
  FinetuneOptions second =
      MemorisationOptions(second_dir, AdapterMethod::kPrompt);
  first.steps = second.steps = 3;
  ASSERT_TRUE(RunFinetune(first).ok());
  ASSERT_TRUE(RunFinetune(second).ok());
  const std::vector<std::string> a = ReadLines(first.loss_log_path);
  const std::vector<std::string> b = ReadLines(second.loss_log_path);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 1; i < a.size(); ++i) {
    EXPECT_EQ(a[i].substr(0, a[i].rfind(',')), b[i].substr(0, b[i].rfind(',')));
  }
}

TEST(Finetune, StopSavesAdapter) {
  TempDir dir;
  FinetuneOptions options = MemorisationOptions(dir, AdapterMethod::kPrompt);
  std::atomic<bool> stop{true};
  auto result = RunFinetune(options, &stop);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->interrupted);
  EXPECT_EQ(result->steps_done, 1);
  EXPECT_TRUE(std::filesystem::exists(options.output_dir +
                                      "/adapter_model.safetensors"));
}

}  // namespace
}  // namespace pollen::client
