// Architecture hyperparameters of a Hugging Face Llama checkpoint, read from
// its config.json.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace pollen {

// The fields of config.json that the Llama forward pass needs. A plain,
// copyable value type.
struct ModelConfig {
  std::string model_type;  // "llama" or "mistral"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  // Equals num_attention_heads when config.json omits it (no grouped-query
  // attention).
  int64_t num_key_value_heads = 0;
  // hidden_size / num_attention_heads unless config.json sets head_dim.
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rope_theta = 10000;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int bos_token_id = 1;
  // The first id when config.json lists several.
  int eos_token_id = 2;
  // Dtype the checkpoint was saved in ("float32", "bfloat16", ...); empty
  // when config.json omits it.
  std::string torch_dtype;
};

// Parses and validates the text of a config.json. `source_name` (usually the
// file path) appears in error messages.
//
// Returns INVALID_ARGUMENT when the text is not a JSON object, a required
// field is missing or not a positive integer, or the head counts do not
// divide evenly. Also returns INVALID_ARGUMENT for architectures that
// LlamaBlock does not compute: a model_type other than llama or mistral, a
// hidden_act other than silu, rope_scaling, attention or MLP biases, and a
// Mistral sliding window shorter than max_position_embeddings.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source_name);

// Reads and parses MODEL_DIR/config.json. Returns NOT_FOUND when the file is
// missing, otherwise what ParseModelConfig returns.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace pollen
