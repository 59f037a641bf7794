#include "common/model_config.h"

#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/test_support.h"

namespace pollen {
namespace {

using Json = nlohmann::json;

// A valid grouped-query Llama config that each test modifies.
Json BaseConfig() {
  return Json{{"model_type", "llama"},
              {"hidden_size", 64},
              {"intermediate_size", 172},
              {"num_hidden_layers", 5},
              {"num_attention_heads", 8},
              {"num_key_value_heads", 4},
              {"vocab_size", 512},
              {"max_position_embeddings", 512},
              {"hidden_act", "silu"}};
}

absl::Status ParseError(const Json& config) {
  return ParseModelConfig(config.dump(), "test.json").status();
}

TEST(ModelConfig, Stories260k) {
  auto config = LoadModelConfig(pollen::testing::Stories260kDir());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model_type, "llama");
  EXPECT_EQ(config->hidden_size, 64);
  EXPECT_EQ(config->intermediate_size, 172);
  EXPECT_EQ(config->num_hidden_layers, 5);
  EXPECT_EQ(config->num_attention_heads, 8);
  EXPECT_EQ(config->num_key_value_heads, 4);
  EXPECT_EQ(config->head_dim, 8);
  EXPECT_EQ(config->vocab_size, 512);
  EXPECT_EQ(config->max_position_embeddings, 512);
  EXPECT_DOUBLE_EQ(config->rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(config->rms_norm_eps, 1e-5);
  EXPECT_TRUE(config->tie_word_embeddings);
  EXPECT_EQ(config->bos_token_id, 1);
  EXPECT_EQ(config->eos_token_id, 2);
  EXPECT_EQ(config->torch_dtype, "float32");
}

TEST(ModelConfig, Defaults) {
  Json json = BaseConfig();
  json.erase("num_key_value_heads");
  json.erase("max_position_embeddings");
  auto config = ParseModelConfig(json.dump(), "test.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->num_key_value_heads, 8);
  EXPECT_EQ(config->max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(config->rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(config->rms_norm_eps, 1e-6);
  EXPECT_FALSE(config->tie_word_embeddings);
  EXPECT_EQ(config->torch_dtype, "");
}

TEST(ModelConfig, ExplicitHeadDim) {
  Json json = BaseConfig();
  json["hidden_size"] = 60;  // not a multiple of 8 heads
  json["head_dim"] = 16;
  auto config = ParseModelConfig(json.dump(), "test.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->head_dim, 16);
}

TEST(ModelConfig, EosListTakesFirst) {
  Json json = BaseConfig();
  json["eos_token_id"] = {128001, 128009};
  json["bos_token_id"] = 128000;
  auto config = ParseModelConfig(json.dump(), "test.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->eos_token_id, 128001);
  EXPECT_EQ(config->bos_token_id, 128000);
}

TEST(ModelConfig, MistralWithoutWindow) {
  Json json = BaseConfig();
  json["model_type"] = "mistral";
  json["sliding_window"] = nullptr;
  EXPECT_TRUE(ParseModelConfig(json.dump(), "test.json").ok());
}

TEST(ModelConfig, MissingField) {
  for (const char* key : {"hidden_size", "intermediate_size",
                          "num_hidden_layers", "num_attention_heads",
                          "vocab_size", "model_type"}) {
    Json json = BaseConfig();
    json.erase(key);
    const absl::Status status = ParseError(json);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_NE(status.message().find(key), absl::string_view::npos) << status;
    EXPECT_NE(status.message().find("missing"), absl::string_view::npos)
        << status;
  }
}

TEST(ModelConfig, RejectsBadValues) {
  struct Case {
    const char* key;
    Json value;
    const char* expected;  // part of the message
  };
  const std::vector<Case> cases = {
      {"hidden_size", 0, "must be positive, got 0"},
      {"num_hidden_layers", -3, "must be positive, got -3"},
      {"vocab_size", "512", "must be an integer"},
      {"intermediate_size", 17.5, "must be an integer"},
      {"num_attention_heads", 7, "must divide hidden_size (64)"},
      {"num_key_value_heads", 3, "must divide num_attention_heads (8)"},
      {"model_type", "gpt2", "'gpt2'"},
      {"hidden_act", "gelu", "'gelu'"},
      {"rms_norm_eps", -1.0, "must be positive"},
      {"rope_theta", "big", "must be a number"},
      {"tie_word_embeddings", 1, "true or false"},
      {"rope_scaling", Json{{"rope_type", "llama3"}}, "rope_scaling"},
      {"attention_bias", true, "bias"},
      {"head_dim", 7, "must be even"},
      {"eos_token_id", "two", "eos_token_id"},
  };
  for (const Case& test_case : cases) {
    Json json = BaseConfig();
    json[test_case.key] = test_case.value;
    const absl::Status status = ParseError(json);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument)
        << test_case.key;
    EXPECT_NE(status.message().find(test_case.expected),
              absl::string_view::npos)
        << status;
    EXPECT_NE(status.message().find("test.json"), absl::string_view::npos)
        << status;
  }
}

TEST(ModelConfig, RejectsShortSlidingWindow) {
  Json json = BaseConfig();
  json["model_type"] = "mistral";
  json["sliding_window"] = 128;
  const absl::Status status = ParseError(json);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("sliding_window"), absl::string_view::npos)
      << status;
}

TEST(ModelConfig, RejectsNonJson) {
  const absl::Status status =
      ParseModelConfig("{\"hidden_size\": ", "broken.json").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("broken.json"), absl::string_view::npos)
      << status;
}

TEST(ModelConfig, RejectsNonObject) {
  const absl::Status status = ParseModelConfig("[64]", "list.json").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("JSON object"), absl::string_view::npos)
      << status;
}

TEST(ModelConfig, MissingFile) {
  pollen::testing::TempDir dir;
  const absl::Status status = LoadModelConfig(dir.path()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("config.json"), absl::string_view::npos)
      << status;
}

}  // namespace
}  // namespace pollen
