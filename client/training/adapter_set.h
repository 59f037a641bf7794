// Trainable adapters of a Llama model on the client: prompt embeddings, deep
// prompts and LoRA matrices, with their files in Hugging Face PEFT layout.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "pollen/v1/pollen.pb.h"

namespace pollen::client {

enum class AdapterMethod { kPrompt, kDeepPrompt, kLora };

// Parses "prompt", "deep-prompt" or "lora".
absl::StatusOr<AdapterMethod> ParseAdapterMethod(const std::string& name);
const char* AdapterMethodName(AdapterMethod method);

// Shape of the adapters, as adapter_config.json stores it.
struct AdapterConfig {
  AdapterMethod method = AdapterMethod::kPrompt;
  // Prompt methods: number of trainable positions before the input.
  int prefix_length = 16;
  // LoRA: rank r, alpha (scaling = alpha / r) and the projections adapted.
  int lora_rank = 8;
  float lora_alpha = 16;
  std::vector<std::string> lora_targets = {"q_proj", "v_proj"};
  // Also trains copies of the final norm and the LM head on the client, with
  // any method. Saved as PEFT modules_to_save ("norm", "lm_head").
  bool train_head = false;
  // Written as base_model_name_or_path.
  std::string base_model;
};

// One LoRA pair: the projection computes W x + scaling * B (A x).
struct LoraPair {
  at::Tensor a;  // [rank, in_features]
  at::Tensor b;  // [out_features, rank]
};

// The trainable tensors of one adapter, all float32 on one device.
// Thread-compatible.
struct AdapterSet {
  AdapterConfig config;
  // Prompt and deep prompt: [prefix_length, hidden], prepended to the input
  // embeddings. Undefined for LoRA.
  at::Tensor prompt;
  // Deep prompt: [num_blocks, prefix_length, hidden], row i added to the
  // prefix positions before block i. Undefined otherwise.
  at::Tensor deep_prompt;
  // LoRA: block index -> target ("q_proj", ...) -> pair.
  std::map<int, std::map<std::string, LoraPair>> lora;
  // With config.train_head: the final norm [hidden] and LM head [vocab,
  // hidden] that replace the checkpoint's. Undefined otherwise.
  at::Tensor norm;
  at::Tensor lm_head;

  // Number of positions added before the input tokens.
  int64_t PrefixLength() const;
  float LoraScaling() const;

  // All trainable tensors, in a fixed order.
  std::vector<at::Tensor> Parameters() const;
};

// Appends the adapters of blocks [start, end) to `out` in wire form: one
// BlockAdapters per block that has a deep prompt row ([1, prefix_length,
// hidden]) or LoRA pairs. Prompt tuning's input prompt is not included,
// because the client prepends it to the embeddings itself.
absl::Status AppendBlockAdapters(
    const AdapterSet& adapters, int start, int end,
    google::protobuf::RepeatedPtrField<v1::BlockAdapters>* out);

// The input and output widths of a Llama projection ("q_proj", ...), or
// INVALID_ARGUMENT naming the target and the valid ones.
absl::StatusOr<std::pair<int64_t, int64_t>> ProjectionShape(
    const ModelConfig& model, const std::string& target);

// Creates fresh trainable adapters. Prompts start as copies of random rows of
// `embed_tokens` [vocab, hidden], and deep prompts start at zero. LoRA A
// draws from kaiming-uniform (bound 1 / sqrt(in_features), as PEFT does) and
// B starts at zero, so a new LoRA adapter leaves the model unchanged. Uses libtorch's global
// generator, so seed it first for reproducible adapters.
absl::StatusOr<AdapterSet> InitAdapters(const AdapterConfig& config,
                                        const ModelConfig& model,
                                        const at::Tensor& embed_tokens,
                                        at::Device device);

// Sets adapters->norm and adapters->lm_head to trainable float32 copies of
// the checkpoint's `norm` [hidden] and `lm_head` [vocab, hidden], on the
// device of the adapters' other tensors (or `norm`'s when there are none).
void InitTrainableHead(const at::Tensor& norm, const at::Tensor& lm_head,
                       AdapterSet* adapters);

// Writes DIR/adapter_model.safetensors and DIR/adapter_config.json,
// creating DIR. LoRA tensors use PEFT names
// (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, mlp.* for
// gate/up/down), prompts use PEFT's "prompt_embeddings", deep prompts the
// Pollen name "deep_prompt_embeddings", and a trained head PEFT's
// modules_to_save names (base_model.model.model.norm.weight,
// base_model.model.lm_head.weight).
absl::Status SaveAdapters(const AdapterSet& adapters, const std::string& dir);

// Reads what SaveAdapters writes, as float32 on `device`. Returns NOT_FOUND
// when a file is missing and INVALID_ARGUMENT when the config is malformed or
// a tensor is missing or does not fit `model`.
absl::StatusOr<AdapterSet> LoadAdapters(const std::string& dir,
                                        const ModelConfig& model,
                                        at::Device device);

}  // namespace pollen::client
