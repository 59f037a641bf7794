#include "common/model_config.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#include "common/status_util.h"

namespace pollen {
namespace {

using Json = nlohmann::json;

// The default of LlamaConfig in Hugging Face transformers
// (configuration_llama.py), used when config.json omits
// max_position_embeddings.
constexpr int64_t kDefaultMaxPositionEmbeddings = 2048;

absl::Status FieldError(const std::string& source, const std::string& key,
                        const std::string& problem) {
  return absl::InvalidArgumentError(
      absl::StrCat("config field '", key, "' in ", source, " ", problem));
}

// Reads a positive integer field. A missing or null field yields
// `default_value`, or an error when there is no default.
absl::StatusOr<int64_t> ReadPositiveInt(const Json& config,
                                        const std::string& key,
                                        const std::string& source,
                                        std::optional<int64_t> default_value) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) {
    if (default_value.has_value()) return *default_value;
    return FieldError(source, key, "is missing");
  }
  if (!it->is_number_integer()) {
    return FieldError(source, key,
                      absl::StrCat("must be an integer, got ", it->dump()));
  }
  const int64_t value = it->get<int64_t>();
  if (value <= 0) {
    return FieldError(source, key,
                      absl::StrCat("must be positive, got ", value));
  }
  return value;
}

absl::StatusOr<double> ReadPositiveNumber(const Json& config,
                                          const std::string& key,
                                          const std::string& source,
                                          double default_value) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return default_value;
  if (!it->is_number()) {
    return FieldError(source, key,
                      absl::StrCat("must be a number, got ", it->dump()));
  }
  const double value = it->get<double>();
  if (!(value > 0)) {
    return FieldError(source, key,
                      absl::StrCat("must be positive, got ", it->dump()));
  }
  return value;
}

absl::StatusOr<bool> ReadBool(const Json& config, const std::string& key,
                              const std::string& source, bool default_value) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return default_value;
  if (!it->is_boolean()) {
    return FieldError(source, key,
                      absl::StrCat("must be true or false, got ", it->dump()));
  }
  return it->get<bool>();
}

absl::StatusOr<std::string> ReadString(const Json& config,
                                       const std::string& key,
                                       const std::string& source,
                                       const std::string& default_value) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return default_value;
  if (!it->is_string()) {
    return FieldError(source, key,
                      absl::StrCat("must be a string, got ", it->dump()));
  }
  return it->get<std::string>();
}

// Reads a token id that may be an integer, null, or (for eos_token_id) a
// list of integers, of which the first is taken.
absl::StatusOr<int> ReadTokenId(const Json& config, const std::string& key,
                                const std::string& source, int default_value) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return default_value;
  const Json* value = &*it;
  if (value->is_array()) {
    if (value->empty()) return default_value;
    value = &value->front();
  }
  if (!value->is_number_integer() || value->get<int64_t>() < 0) {
    return FieldError(source, key,
                      absl::StrCat("must be a non-negative integer or a list "
                                   "of them, got ",
                                   it->dump()));
  }
  return static_cast<int>(value->get<int64_t>());
}

// Rejects config.json options that change the forward pass in ways that
// LlamaBlock does not implement, so that such a model fails to load instead
// of producing wrong outputs.
absl::Status CheckArchitecture(const Json& config, const std::string& source,
                               const ModelConfig& result) {
  if (result.model_type != "llama" && result.model_type != "mistral") {
    return absl::InvalidArgumentError(absl::StrCat(
        "model_type '", result.model_type, "' in ", source,
        " is not supported; Pollen runs Llama-architecture models "
        "(model_type llama or mistral)"));
  }

  POLLEN_ASSIGN_OR_RETURN(const std::string hidden_act,
                          ReadString(config, "hidden_act", source, "silu"));
  if (hidden_act != "silu") {
    return FieldError(source, "hidden_act",
                      absl::StrCat("is '", hidden_act,
                                   "'; only silu (SwiGLU MLP) is supported"));
  }

  // TODO: support rope_scaling (Llama 3.1 "llama3", linear, dynamic), which
  // changes the rotary frequencies. RotaryEmbedding computes only the
  // unscaled table.
  const auto scaling = config.find("rope_scaling");
  if (scaling != config.end() && !scaling->is_null()) {
    return FieldError(source, "rope_scaling",
                      absl::StrCat("is ", scaling->dump(),
                                   "; only unscaled rotary embeddings (null) "
                                   "are supported"));
  }

  for (const char* key : {"attention_bias", "mlp_bias"}) {
    POLLEN_ASSIGN_OR_RETURN(const bool has_bias,
                            ReadBool(config, key, source, false));
    if (has_bias) {
      return FieldError(source, key,
                        "is true; projections with bias are not supported");
    }
  }

  // Mistral attends only to the last sliding_window positions. That equals
  // full causal attention as long as no sequence is longer than the window.
  const auto window = config.find("sliding_window");
  if (window != config.end() && !window->is_null()) {
    if (!window->is_number_integer() ||
        window->get<int64_t>() < result.max_position_embeddings) {
      return FieldError(
          source, "sliding_window",
          absl::StrCat("is ", window->dump(),
                       "; sliding-window attention is not supported, so it "
                       "must be null or at least max_position_embeddings (",
                       result.max_position_embeddings, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source_name) {
  const Json config = Json::parse(json_text, /*cb=*/nullptr,
                                  /*allow_exceptions=*/false);
  if (config.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config ", source_name, " is not valid JSON"));
  }
  if (!config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model config ", source_name, " must be a JSON object, got ",
        config.type_name()));
  }
  const std::string& source = source_name;
  ModelConfig result;

  // Sizes.
  POLLEN_ASSIGN_OR_RETURN(result.model_type,
                          ReadString(config, "model_type", source, ""));
  if (result.model_type.empty()) {
    return FieldError(source, "model_type", "is missing");
  }
  POLLEN_ASSIGN_OR_RETURN(
      result.hidden_size,
      ReadPositiveInt(config, "hidden_size", source, std::nullopt));
  POLLEN_ASSIGN_OR_RETURN(
      result.intermediate_size,
      ReadPositiveInt(config, "intermediate_size", source, std::nullopt));
  POLLEN_ASSIGN_OR_RETURN(
      result.num_hidden_layers,
      ReadPositiveInt(config, "num_hidden_layers", source, std::nullopt));
  POLLEN_ASSIGN_OR_RETURN(
      result.num_attention_heads,
      ReadPositiveInt(config, "num_attention_heads", source, std::nullopt));
  POLLEN_ASSIGN_OR_RETURN(
      result.num_key_value_heads,
      ReadPositiveInt(config, "num_key_value_heads", source,
                      result.num_attention_heads));
  POLLEN_ASSIGN_OR_RETURN(
      result.vocab_size,
      ReadPositiveInt(config, "vocab_size", source, std::nullopt));
  POLLEN_ASSIGN_OR_RETURN(
      result.max_position_embeddings,
      ReadPositiveInt(config, "max_position_embeddings", source,
                      kDefaultMaxPositionEmbeddings));

  // Head layout. Without an explicit head_dim the heads split hidden_size.
  const bool has_head_dim =
      config.contains("head_dim") && !config["head_dim"].is_null();
  if (!has_head_dim &&
      result.hidden_size % result.num_attention_heads != 0) {
    return FieldError(
        source, "num_attention_heads",
        absl::StrCat("(", result.num_attention_heads,
                     ") must divide hidden_size (", result.hidden_size,
                     ") when head_dim is not given"));
  }
  POLLEN_ASSIGN_OR_RETURN(
      result.head_dim,
      ReadPositiveInt(config, "head_dim", source,
                      result.hidden_size / result.num_attention_heads));
  if (result.head_dim % 2 != 0) {
    return FieldError(source, "head_dim",
                      absl::StrCat("must be even for rotary embeddings, got ",
                                   result.head_dim));
  }
  if (result.num_attention_heads % result.num_key_value_heads != 0) {
    return FieldError(
        source, "num_key_value_heads",
        absl::StrCat("(", result.num_key_value_heads,
                     ") must divide num_attention_heads (",
                     result.num_attention_heads, ")"));
  }

  // Numerics and token ids.
  POLLEN_ASSIGN_OR_RETURN(result.rope_theta,
                          ReadPositiveNumber(config, "rope_theta", source,
                                             result.rope_theta));
  POLLEN_ASSIGN_OR_RETURN(result.rms_norm_eps,
                          ReadPositiveNumber(config, "rms_norm_eps", source,
                                             result.rms_norm_eps));
  POLLEN_ASSIGN_OR_RETURN(result.tie_word_embeddings,
                          ReadBool(config, "tie_word_embeddings", source,
                                   result.tie_word_embeddings));
  POLLEN_ASSIGN_OR_RETURN(result.bos_token_id,
                          ReadTokenId(config, "bos_token_id", source,
                                      result.bos_token_id));
  POLLEN_ASSIGN_OR_RETURN(result.eos_token_id,
                          ReadTokenId(config, "eos_token_id", source,
                                      result.eos_token_id));
  POLLEN_ASSIGN_OR_RETURN(result.torch_dtype,
                          ReadString(config, "torch_dtype", source, ""));

  POLLEN_RETURN_IF_ERROR(CheckArchitecture(config, source, result));
  return result;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path =
      (std::filesystem::path(model_dir) / "config.json").string();
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    const int open_error = errno;
    std::error_code error;
    if (!std::filesystem::exists(path, error)) {
      return absl::NotFoundError(
          absl::StrCat("model config ", path, " not found"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("model config ", path,
                     " could not be opened: ", std::strerror(open_error)));
  }
  std::stringstream text;
  text << file.rdbuf();
  return ParseModelConfig(text.str(), path);
}

}  // namespace pollen
