// `pollen make-checkpoint` and `pollen bench` as users run them.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>

#include "client/tokenizer.h"
#include "common/checkpoint.h"
#include "node/block_span.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

// The keys `pollen bench --json` must print.
constexpr const char* kBenchKeys[] = {
    "local_decode_tok_s",  "swarm_decode_tok_s", "decode_ratio",
    "local_prefill_tok_s", "swarm_prefill_tok_s", "prefill_ratio",
    "hop_overhead_ms",     "sessions",            "aggregate_tok_s",
    "aggregate_ratio",     "bandwidth_gb_s",      "bound_fraction"};

CommandResult MakeCheckpoint(const std::vector<std::string>& flags) {
  std::vector<std::string> argv = {PollenBinary(), "make-checkpoint"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  return RunCommand(argv);
}

CommandResult Bench(const std::string& model_dir,
                    const std::vector<std::string>& flags) {
  std::vector<std::string> argv = {PollenBinary(), "bench", "--model", model_dir};
  argv.insert(argv.end(), flags.begin(), flags.end());
  return RunCommand(argv, "", absl::Seconds(240));
}

// Runs `pollen bench --json` and checks what every successful run prints.
nlohmann::json BenchJson(const std::string& model_dir,
                         const std::vector<std::string>& flags) {
  std::vector<std::string> all = flags;
  all.push_back("--json");
  const CommandResult result = Bench(model_dir, all);
  EXPECT_EQ(result.exit_code, 0) << result.stderr_text << result.stdout_text;
  const auto output = nlohmann::json::parse(result.stdout_text, nullptr, false);
  EXPECT_TRUE(output.is_object()) << result.stdout_text;
  if (!output.is_object()) return nlohmann::json::object();

  for (const char* key : kBenchKeys) {
    EXPECT_TRUE(output.contains(key)) << key;
    if (!output.contains(key)) continue;
    EXPECT_TRUE(output[key].is_number()) << key;
    if (!output[key].is_number()) continue;
    EXPECT_TRUE(std::isfinite(output[key].get<double>())) << key;
  }
  for (const char* key : {"local_decode_tok_s", "swarm_decode_tok_s",
                          "local_prefill_tok_s", "swarm_prefill_tok_s",
                          "aggregate_tok_s", "decode_ratio", "prefill_ratio",
                          "aggregate_ratio", "bandwidth_gb_s", "bound_fraction"}) {
    EXPECT_GT(output.value(key, 0.0), 0) << key;
  }
  EXPECT_EQ(output.value("tokens_match", false), true) << output.value("mismatch", "");
  return output;
}

TEST(BenchCommand, JsonHasEveryKeyForStories) {
  const auto output =
      BenchJson(Stories260kDir(), {"--nodes", "2", "--sessions", "2",
                                   "--prompt-tokens", "8", "--new-tokens", "8"});
  EXPECT_EQ(output.value("sessions", 0), 2);
  EXPECT_EQ(output.value("nodes", 0), 2);
  EXPECT_EQ(output.value("num_blocks", 0), 5);
  EXPECT_EQ(output.value("prompt_tokens", 0), 8);
  EXPECT_EQ(output.value("new_tokens", 0), 8);
  // One token after the prompt, then one per decode step.
  EXPECT_EQ(output["new_ids"].size(), 9u);
  // Swarm steps cross processes, so they cannot beat local ones by much.
  EXPECT_LT(output.value("decode_ratio", 0.0), 2);
  EXPECT_GT(output.value("hop_overhead_ms", -1.0), -1);
  EXPECT_GT(output.value("weight_bytes", 0), 0);
  EXPECT_NE(output.value("bandwidth_method", "").find("threads summing"),
            std::string::npos);
}

TEST(BenchCommand, TextShowsTable) {
  const CommandResult result =
      Bench(Stories260kDir(), {"--nodes", "2", "--sessions", "2",
                               "--prompt-tokens", "4", "--new-tokens", "4",
                               "--repetitions", "1"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  for (const char* text : {"decode tok/s", "prefill tok/s", "hop overhead",
                           "2 sessions", "memory bandwidth", "decode bound",
                           "tokens match       yes"}) {
    EXPECT_NE(result.stdout_text.find(text), std::string::npos)
        << text << "\n" << result.stdout_text;
  }
}

TEST(BenchCommand, RunsRandomCheckpointInBfloat16) {
  TempDir dir;
  const std::string model_dir = dir.path() + "/tiny";
  const CommandResult make_result = MakeCheckpoint(
      {"--shape", "test-tiny", "--dtype", "bf16", "--out", model_dir});
  ASSERT_EQ(make_result.exit_code, 0) << make_result.stderr_text;

  const auto output = BenchJson(
      model_dir, {"--nodes", "2", "--sessions", "3", "--prompt-tokens", "16",
                  "--new-tokens", "4", "--dtype", "bfloat16", "--repetitions", "2"});
  EXPECT_EQ(output.value("dtype", ""), "bfloat16");
  EXPECT_EQ(output.value("sessions", 0), 3);
}

TEST(BenchCommand, RejectsBadFlags) {
  const std::string stories = Stories260kDir();
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--nodes", "0"}, "--nodes 0 is outside 1..5"},
      {{"--nodes", "6"}, "--nodes 6 is outside 1..5"},
      {{"--sessions", "0"}, "--sessions 0"},
      {{"--new-tokens", "0"}, "--new-tokens must be at least 1"},
      {{"--prompt-tokens", "0"}, "--prompt-tokens 0"},
      {{"--prompt-tokens", "600"}, "--prompt-tokens 600 is outside 1..511"},
      {{"--prompt-tokens", "500", "--new-tokens", "20"},
       "exceed the model's 512 positions"},
      {{"--dtype", "int4"}, "unknown dtype 'int4'"},
      {{"--repetitions", "0"}, "--repetitions 0"},
  };
  for (const auto& [flags, message] : cases) {
    const CommandResult result = Bench(stories, flags);
    EXPECT_EQ(result.exit_code, 2) << flags[0] << " " << flags[1];
    EXPECT_NE(result.stderr_text.find(message), std::string::npos)
        << result.stderr_text;
    EXPECT_EQ(result.stdout_text, "");
  }

  const CommandResult no_model = RunCommand({PollenBinary(), "bench"});
  EXPECT_EQ(no_model.exit_code, 2);
  EXPECT_NE(no_model.stderr_text.find("needs --model"), std::string::npos);

  const CommandResult missing = Bench("/nonexistent/model", {});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.stderr_text.find("not found"), std::string::npos)
      << missing.stderr_text;
}

TEST(MakeCheckpointCommand, SameSeedGivesSameFiles) {
  TempDir dir;
  for (const char* name : {"a", "b"}) {
    const CommandResult result = MakeCheckpoint(
        {"--shape", "test-tiny", "--seed", "3", "--out", dir.path() + "/" + name});
    ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
    EXPECT_NE(result.stdout_text.find("wrote a random test-tiny checkpoint"),
              std::string::npos) << result.stdout_text;
  }
  for (const char* file : {"config.json", "tokenizer.model", "model.safetensors"}) {
    const std::string a = ReadFile(dir.path() + "/a/" + file);
    EXPECT_FALSE(a.empty()) << file;
    EXPECT_EQ(a, ReadFile(dir.path() + "/b/" + file)) << file;
  }
}

TEST(MakeCheckpointCommand, RejectsBadFlags) {
  TempDir dir;
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--shape", "llama9", "--out", dir.path() + "/x"}, "unknown shape 'llama9'"},
      {{"--shape", "test-tiny"}, "needs --out DIR"},
      {{"--shape", "test-tiny", "--dtype", "int8", "--out", dir.path() + "/x"},
       "unknown dtype 'int8'"},
      {{"--shape", "test-tiny", "--layers", "-2", "--out", dir.path() + "/x"},
       "--layers must be at least 1"},
  };
  for (const auto& [flags, message] : cases) {
    const CommandResult result = MakeCheckpoint(flags);
    EXPECT_EQ(result.exit_code, 2) << flags[1];
    EXPECT_NE(result.stderr_text.find(message), std::string::npos)
        << result.stderr_text;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/x"));

  // A folder with other files is left alone.
  const CommandResult into_model = MakeCheckpoint(
      {"--shape", "test-tiny", "--out", Stories260kDir()});
  EXPECT_EQ(into_model.exit_code, 1);
  EXPECT_NE(into_model.stderr_text.find("is not an empty folder"),
            std::string::npos)
      << into_model.stderr_text;
}

// One block of the real TinyLlama shape: about 700 MB, most of it the
// embeddings and LM head.
TEST(MakeCheckpointCommand, TinyLlamaLayerLoadsInNodeSpan) {
  TempDir dir;
  const std::string model_dir = dir.path() + "/tinyllama";
  const CommandResult result = MakeCheckpoint(
      {"--shape", "tinyllama-1.1b", "--layers", "1", "--out", model_dir});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;

  auto checkpoint = Checkpoint::Open(model_dir);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  EXPECT_EQ(config.hidden_size, 2048);
  EXPECT_EQ(config.intermediate_size, 5632);
  EXPECT_EQ(config.num_attention_heads, 32);
  EXPECT_EQ(config.num_key_value_heads, 4);
  EXPECT_EQ(config.num_hidden_layers, 1);
  EXPECT_EQ(config.vocab_size, 32000);
  EXPECT_EQ(config.max_position_embeddings, 2048);
  EXPECT_EQ((*checkpoint)->TensorNames().size(), 12u);

  // The span a node would load, and one step through it.
  auto span = node::BlockSpan::Load(**checkpoint, 0, 1, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();
  std::vector<node::LayerKvCache> cache = (*span)->AllocateCache(0, 1, 1, 4);
  auto output = (*span)->Forward(at::randn({1, 4, 2048}) * 0.02, cache, 0, 0, 1);
  ASSERT_TRUE(output.ok()) << output.status();
  EXPECT_TRUE(at::isfinite(*output).all().item<bool>());

  auto tokenizer = client::Tokenizer::Load(model_dir + "/tokenizer.model");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->vocab_size(), 32000);
  const std::string text = "Once upon a time, there was a little girl named Lily.";
  EXPECT_EQ((*tokenizer)->Decode((*tokenizer)->Encode(text, true)), text);
}

}  // namespace
}  // namespace pollen::testing
