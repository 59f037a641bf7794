// `pollen node --quantize int8` serving through a real swarm, `pollen eval`,
// and the errors for bad --dtype and --quantize values.
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Two int8 nodes, one computing in float32 and one in bfloat16.
class QuantizedSwarmTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    swarm_ = new LocalSwarm();
    auto first = swarm_->StartNode(Stories260kDir(), "stories260k", 0, 3,
                                   {"--quantize", "int8"});
    ASSERT_TRUE(first.ok()) << first.status();
    auto second = swarm_->StartNode(Stories260kDir(), "stories260k", 3, 5,
                                    {"--quantize", "int8", "--dtype", "bf16"});
    ASSERT_TRUE(second.ok()) << second.status();
  }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
  }

  static LocalSwarm* swarm_;
};

LocalSwarm* QuantizedSwarmTest::swarm_ = nullptr;

TEST_F(QuantizedSwarmTest, GeneratesThroughInt8Nodes) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "generate", "--model", Stories260kDir(),
       "--initial-peers", swarm_->peer(), "--prompt", kStoriesPrompt,
       "--max-new-tokens", "24", "--temperature", "0", "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);
  EXPECT_EQ(output["route"].size(), 2u);
  const std::vector<int> new_ids = output["new_ids"].get<std::vector<int>>();
  ASSERT_EQ(new_ids.size(), 24u);

  // Greedy decoding starts like float32's reference story. int8 rounding
  // could change a later token, so only the first 8 are compared.
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(new_ids[i], kStoriesReferenceIds[i]) << "token " << i;
  }
}

TEST_F(QuantizedSwarmTest, StatusShowsQuantization) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "status", "--initial-peers", swarm_->peer(), "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);
  std::map<std::string, std::string> dtype_by_node;
  for (const auto& model : output["models"]) {
    for (const auto& node : model["nodes"]) {
      dtype_by_node[node["name"].get<std::string>()] =
          node["dtype"].get<std::string>() + "+" +
          node["quantization"].get<std::string>();
    }
  }
  EXPECT_EQ(dtype_by_node["test-node-0"], "float32+int8");
  EXPECT_EQ(dtype_by_node["test-node-1"], "bfloat16+int8");

  const CommandResult text = RunCommand(
      {PollenBinary(), "status", "--initial-peers", swarm_->peer()});
  ASSERT_EQ(text.exit_code, 0) << text.stderr_text;
  EXPECT_TRUE(Contains(text.stdout_text, "bfloat16+int8")) << text.stdout_text;
}

TEST(QuantizeFlag, NodeRejectsUnknownValue) {
  const CommandResult result =
      RunCommand({PollenBinary(), "node", "--model", Stories260kDir(),
                  "--blocks", "0:1", "--quantize", "int4"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_TRUE(Contains(result.stderr_text, "--quantize")) << result.stderr_text;
  EXPECT_TRUE(Contains(result.stderr_text, "'int4'")) << result.stderr_text;
  EXPECT_TRUE(Contains(result.stderr_text, "none or int8"))
      << result.stderr_text;
}

TEST(DtypeFlag, NodeRejectsUnknownValue) {
  const CommandResult result =
      RunCommand({PollenBinary(), "node", "--model", Stories260kDir(),
                  "--blocks", "0:1", "--dtype", "fp64"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_TRUE(Contains(result.stderr_text, "--dtype")) << result.stderr_text;
  EXPECT_TRUE(Contains(result.stderr_text, "'fp64'")) << result.stderr_text;
  EXPECT_TRUE(Contains(result.stderr_text, "bf16")) << result.stderr_text;
}

class EvalCommandTest : public ::testing::Test {
 protected:
  void SetUp() override {
    text_path_ = dir_.path() + "/story.txt";
    std::ofstream(text_path_) << kStoriesReferenceText;
  }

  std::vector<std::string> EvalArgs() const {
    return {PollenBinary(), "eval", "--model", Stories260kDir(), "--text",
            text_path_};
  }

  TempDir dir_;
  std::string text_path_;
};

TEST_F(EvalCommandTest, JsonHasEveryKey) {
  std::vector<std::string> argv = EvalArgs();
  argv.insert(argv.end(), {"--dtype", "bf16", "--quantize", "int8", "--json"});
  const CommandResult result = RunCommand(argv);
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);
  for (const char* key :
       {"top1_agreement", "perplexity_reference", "perplexity",
        "perplexity_change", "weight_bytes_reference", "weight_bytes",
        "tokens", "max_abs_logit_diff", "mean_abs_logit_diff"}) {
    EXPECT_TRUE(output.contains(key)) << key;
  }
  EXPECT_EQ(output["dtype"], "bfloat16");
  EXPECT_EQ(output["quantization"], "int8");
  EXPECT_GT(output["tokens"].get<int>(), 40);
  EXPECT_GE(output["top1_agreement"].get<double>(), 0.9);
  EXPECT_LE(output["top1_agreement"].get<double>(), 1.0);
  EXPECT_LT(output["weight_bytes"].get<int64_t>() * 3,
            output["weight_bytes_reference"].get<int64_t>());
}

TEST_F(EvalCommandTest, TextPrintsTable) {
  const CommandResult result = RunCommand(EvalArgs());
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  EXPECT_TRUE(Contains(result.stdout_text, "top-1 agreement"))
      << result.stdout_text;
  EXPECT_TRUE(Contains(result.stdout_text, "perplexity")) << result.stdout_text;
}

TEST_F(EvalCommandTest, RejectsBadFlags) {
  std::vector<std::string> bad_quantize = EvalArgs();
  bad_quantize.insert(bad_quantize.end(), {"--quantize", "int3"});
  const CommandResult quantize = RunCommand(bad_quantize);
  EXPECT_EQ(quantize.exit_code, 2);
  EXPECT_TRUE(Contains(quantize.stderr_text, "'int3'")) << quantize.stderr_text;

  std::vector<std::string> bad_dtype = EvalArgs();
  bad_dtype.insert(bad_dtype.end(), {"--dtype", "double"});
  const CommandResult dtype = RunCommand(bad_dtype);
  EXPECT_EQ(dtype.exit_code, 2);
  EXPECT_TRUE(Contains(dtype.stderr_text, "'double'")) << dtype.stderr_text;

  const CommandResult no_text =
      RunCommand({PollenBinary(), "eval", "--model", Stories260kDir()});
  EXPECT_EQ(no_text.exit_code, 2);
  EXPECT_TRUE(Contains(no_text.stderr_text, "--text")) << no_text.stderr_text;

  const CommandResult missing_text =
      RunCommand({PollenBinary(), "eval", "--model", Stories260kDir(),
                  "--text", dir_.path() + "/missing.txt"});
  EXPECT_EQ(missing_text.exit_code, 2);
  EXPECT_TRUE(Contains(missing_text.stderr_text, "missing.txt"))
      << missing_text.stderr_text;

  const CommandResult no_model =
      RunCommand({PollenBinary(), "eval", "--text", text_path_});
  EXPECT_EQ(no_model.exit_code, 2);
  EXPECT_TRUE(Contains(no_model.stderr_text, "--model"))
      << no_model.stderr_text;
}

}  // namespace
}  // namespace pollen::testing
