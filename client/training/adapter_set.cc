#include "client/training/adapter_set.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/safetensors.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"

namespace pollen::client {
namespace {

constexpr char kConfigFile[] = "adapter_config.json";
constexpr char kWeightsFile[] = "adapter_model.safetensors";
constexpr char kPromptName[] = "prompt_embeddings";
constexpr char kDeepPromptName[] = "deep_prompt_embeddings";
constexpr char kNormName[] = "base_model.model.model.norm.weight";
constexpr char kLmHeadName[] = "base_model.model.lm_head.weight";

const std::vector<std::string>& AllTargets() {
  static const auto* targets = new std::vector<std::string>{
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
      "down_proj"};
  return *targets;
}

// PEFT's tensor name of one LoRA matrix; `matrix` is "lora_A" or "lora_B".
std::string LoraTensorName(int block, const std::string& target,
                           const std::string& matrix) {
  const bool mlp =
      target == "gate_proj" || target == "up_proj" || target == "down_proj";
  return absl::StrCat("base_model.model.model.layers.", block,
                      mlp ? ".mlp." : ".self_attn.", target, ".", matrix,
                      ".weight");
}

absl::Status ValidateConfig(const AdapterConfig& config) {
  if (config.method != AdapterMethod::kLora && config.prefix_length <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prefix length ", config.prefix_length, " must be positive"));
  }
  if (config.method == AdapterMethod::kLora) {
    if (config.lora_rank <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA rank ", config.lora_rank, " must be positive"));
    }
    if (config.lora_targets.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LoRA needs at least one target among ",
          absl::StrJoin(AllTargets(), ",")));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> ReadTensor(const SafetensorsFile& file,
                                      const std::string& name,
                                      const std::vector<int64_t>& shape,
                                      at::Device device) {
  POLLEN_ASSIGN_OR_RETURN(at::Tensor tensor, file.Get(name));
  if (tensor.sizes() != at::IntArrayRef(shape)) {
    std::ostringstream message;
    message << "tensor '" << name << "' in " << file.path() << " has shape "
            << tensor.sizes() << ", expected " << at::IntArrayRef(shape);
    return absl::InvalidArgumentError(message.str());
  }
  return tensor.to(device, at::kFloat).clone();
}

}  // namespace

absl::StatusOr<AdapterMethod> ParseAdapterMethod(const std::string& name) {
  if (name == "prompt") return AdapterMethod::kPrompt;
  if (name == "deep-prompt") return AdapterMethod::kDeepPrompt;
  if (name == "lora") return AdapterMethod::kLora;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown fine-tuning method '", name,
      "'; expected prompt, deep-prompt or lora"));
}

const char* AdapterMethodName(AdapterMethod method) {
  switch (method) {
    case AdapterMethod::kPrompt:
      return "prompt";
    case AdapterMethod::kDeepPrompt:
      return "deep-prompt";
    case AdapterMethod::kLora:
      return "lora";
  }
  return "unknown";
}

int64_t AdapterSet::PrefixLength() const {
  return prompt.defined() ? prompt.size(0) : 0;
}

float AdapterSet::LoraScaling() const {
  return config.lora_alpha / static_cast<float>(config.lora_rank);
}

std::vector<at::Tensor> AdapterSet::Parameters() const {
  std::vector<at::Tensor> parameters;
  if (prompt.defined()) parameters.push_back(prompt);
  if (deep_prompt.defined()) parameters.push_back(deep_prompt);
  for (const auto& [block, pairs] : lora) {
    for (const auto& [target, pair] : pairs) {
      parameters.push_back(pair.a);
      parameters.push_back(pair.b);
    }
  }
  if (norm.defined()) parameters.push_back(norm);
  if (lm_head.defined()) parameters.push_back(lm_head);
  return parameters;
}

absl::Status AppendBlockAdapters(
    const AdapterSet& adapters, int start, int end,
    google::protobuf::RepeatedPtrField<v1::BlockAdapters>* out) {
  for (int block = start; block < end; ++block) {
    const auto lora = adapters.lora.find(block);
    if (!adapters.deep_prompt.defined() && lora == adapters.lora.end()) {
      continue;
    }
    v1::BlockAdapters* proto = out->Add();
    proto->set_block(static_cast<uint32_t>(block));
    if (adapters.deep_prompt.defined()) {
      POLLEN_RETURN_IF_ERROR(TensorToProto(
          adapters.deep_prompt[block].detach().unsqueeze(0).contiguous(),
          proto->mutable_prompt()));
    }
    if (lora == adapters.lora.end()) continue;
    for (const auto& [target, pair] : lora->second) {
      v1::LoraWeights* weights = proto->add_lora();
      weights->set_target(target);
      POLLEN_RETURN_IF_ERROR(
          TensorToProto(pair.a.detach().contiguous(), weights->mutable_a()));
      POLLEN_RETURN_IF_ERROR(
          TensorToProto(pair.b.detach().contiguous(), weights->mutable_b()));
      weights->set_scaling(adapters.LoraScaling());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::pair<int64_t, int64_t>> ProjectionShape(
    const ModelConfig& model, const std::string& target) {
  const int64_t hidden = model.hidden_size;
  const int64_t q_width = model.num_attention_heads * model.head_dim;
  const int64_t kv_width = model.num_key_value_heads * model.head_dim;
  const int64_t intermediate = model.intermediate_size;
  if (target == "q_proj") return std::make_pair(hidden, q_width);
  if (target == "k_proj") return std::make_pair(hidden, kv_width);
  if (target == "v_proj") return std::make_pair(hidden, kv_width);
  if (target == "o_proj") return std::make_pair(q_width, hidden);
  if (target == "gate_proj") return std::make_pair(hidden, intermediate);
  if (target == "up_proj") return std::make_pair(hidden, intermediate);
  if (target == "down_proj") return std::make_pair(intermediate, hidden);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown LoRA target '", target, "'; expected one of ",
                   absl::StrJoin(AllTargets(), ",")));
}

absl::StatusOr<AdapterSet> InitAdapters(const AdapterConfig& config,
                                        const ModelConfig& model,
                                        const at::Tensor& embed_tokens,
                                        at::Device device) {
  POLLEN_RETURN_IF_ERROR(ValidateConfig(config));
  AdapterSet adapters;
  adapters.config = config;
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);

  // Prompts: rows of the embedding table, so they start in the range of
  // real token embeddings.
  if (config.method != AdapterMethod::kLora) {
    const at::Tensor rows =
        at::randint(model.vocab_size, {config.prefix_length}, at::kLong);
    adapters.prompt = embed_tokens.detach()
                          .index_select(0, rows.to(embed_tokens.device()))
                          .to(options)
                          .clone()
                          .set_requires_grad(true);
  }
  if (config.method == AdapterMethod::kDeepPrompt) {
    adapters.deep_prompt =
        at::zeros({model.num_hidden_layers, config.prefix_length,
                   model.hidden_size},
                  options)
            .set_requires_grad(true);
  }

  // LoRA: A ~ U(-1/sqrt(in), 1/sqrt(in)), which is kaiming_uniform_ with
  // a = sqrt(5) as PEFT uses; B = 0.
  if (config.method == AdapterMethod::kLora) {
    for (int block = 0; block < model.num_hidden_layers; ++block) {
      for (const std::string& target : config.lora_targets) {
        POLLEN_ASSIGN_OR_RETURN(auto shape, ProjectionShape(model, target));
        const double bound = 1.0 / std::sqrt(static_cast<double>(shape.first));
        LoraPair pair;
        pair.a = (at::rand({config.lora_rank, shape.first}, at::kFloat) * 2 - 1)
                     .mul_(bound)
                     .to(options)
                     .set_requires_grad(true);
        pair.b = at::zeros({shape.second, config.lora_rank}, options)
                     .set_requires_grad(true);
        adapters.lora[block][target] = std::move(pair);
      }
    }
  }
  return adapters;
}

void InitTrainableHead(const at::Tensor& norm, const at::Tensor& lm_head,
                       AdapterSet* adapters) {
  const std::vector<at::Tensor> others = adapters->Parameters();
  const at::Device device =
      others.empty() ? norm.device() : others.front().device();
  adapters->norm =
      norm.detach().to(device, at::kFloat).clone().set_requires_grad(true);
  adapters->lm_head =
      lm_head.detach().to(device, at::kFloat).clone().set_requires_grad(true);
}

absl::Status SaveAdapters(const AdapterSet& adapters, const std::string& dir) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("cannot create adapter folder ",
                                            dir, ": ", error.message()));
  }
  const AdapterConfig& config = adapters.config;

  // Tensors.
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  if (adapters.prompt.defined()) {
    tensors.emplace_back(kPromptName, adapters.prompt.detach().cpu());
  }
  if (adapters.deep_prompt.defined()) {
    tensors.emplace_back(kDeepPromptName, adapters.deep_prompt.detach().cpu());
  }
  for (const auto& [block, pairs] : adapters.lora) {
    for (const auto& [target, pair] : pairs) {
      tensors.emplace_back(LoraTensorName(block, target, "lora_A"),
                           pair.a.detach().cpu());
      tensors.emplace_back(LoraTensorName(block, target, "lora_B"),
                           pair.b.detach().cpu());
    }
  }
  if (adapters.norm.defined()) {
    tensors.emplace_back(kNormName, adapters.norm.detach().cpu());
  }
  if (adapters.lm_head.defined()) {
    tensors.emplace_back(kLmHeadName, adapters.lm_head.detach().cpu());
  }
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("writing adapter tensors", [&] {
    return WriteSafetensors(
        (std::filesystem::path(dir) / kWeightsFile).string(), tensors,
        {{"format", "pt"}});
  }));

  // adapter_config.json in PEFT's field names. Deep prompts have no PEFT
  // counterpart, so they get their own peft_type.
  nlohmann::json json;
  json["base_model_name_or_path"] = config.base_model;
  json["task_type"] = "CAUSAL_LM";
  json["pollen_method"] = AdapterMethodName(config.method);
  if (config.method == AdapterMethod::kLora) {
    json["peft_type"] = "LORA";
    json["r"] = config.lora_rank;
    json["lora_alpha"] = config.lora_alpha;
    json["lora_dropout"] = 0.0;
    json["bias"] = "none";
    json["target_modules"] = config.lora_targets;
  } else {
    json["peft_type"] = config.method == AdapterMethod::kPrompt
                            ? "PROMPT_TUNING"
                            : "POLLEN_DEEP_PROMPT_TUNING";
    json["num_virtual_tokens"] = config.prefix_length;
    json["token_dim"] = adapters.prompt.size(1);
    json["prompt_tuning_init"] = "RANDOM";
  }
  json["modules_to_save"] =
      config.train_head ? nlohmann::json({"lm_head", "norm"}) : nlohmann::json();
  const std::string config_path =
      (std::filesystem::path(dir) / kConfigFile).string();
  std::ofstream out(config_path);
  out << json.dump(2) << "\n";
  out.close();
  if (!out) {
    return absl::InternalError(absl::StrCat("cannot write ", config_path));
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterSet> LoadAdapters(const std::string& dir,
                                        const ModelConfig& model,
                                        at::Device device) {
  // adapter_config.json.
  const std::string config_path =
      (std::filesystem::path(dir) / kConfigFile).string();
  std::ifstream in(config_path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("adapter config ", config_path, " not found"));
  }
  AdapterSet adapters;
  AdapterConfig& config = adapters.config;
  try {
    const nlohmann::json json = nlohmann::json::parse(in);
    const std::string peft_type = json.at("peft_type").get<std::string>();
    config.base_model = json.value("base_model_name_or_path", "");
    if (peft_type == "LORA") {
      config.method = AdapterMethod::kLora;
      config.lora_rank = json.at("r").get<int>();
      config.lora_alpha = json.at("lora_alpha").get<float>();
      config.lora_targets =
          json.at("target_modules").get<std::vector<std::string>>();
    } else if (peft_type == "PROMPT_TUNING" ||
               peft_type == "POLLEN_DEEP_PROMPT_TUNING") {
      config.method = peft_type == "PROMPT_TUNING" ? AdapterMethod::kPrompt
                                                  : AdapterMethod::kDeepPrompt;
      config.prefix_length = json.at("num_virtual_tokens").get<int>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          config_path, ": unsupported peft_type '", peft_type,
          "'; expected LORA, PROMPT_TUNING or POLLEN_DEEP_PROMPT_TUNING"));
    }
    const auto modules = json.find("modules_to_save");
    if (modules != json.end() && !modules->is_null()) {
      const auto names = modules->get<std::vector<std::string>>();
      const bool norm = std::count(names.begin(), names.end(), "norm") > 0;
      const bool lm_head =
          std::count(names.begin(), names.end(), "lm_head") > 0;
      if (norm != lm_head || names.size() != (norm ? 2u : 0u)) {
        return absl::InvalidArgumentError(absl::StrCat(
            config_path, ": modules_to_save is [", absl::StrJoin(names, ","),
            "], but Pollen trains only both of lm_head and norm, or none"));
      }
      config.train_head = norm;
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid adapter config ", config_path, ": ", e.what()));
  }
  POLLEN_RETURN_IF_ERROR(ValidateConfig(config));

  // adapter_model.safetensors.
  POLLEN_ASSIGN_OR_RETURN(
      auto file, SafetensorsFile::Open(
                     (std::filesystem::path(dir) / kWeightsFile).string()));
  const int64_t hidden = model.hidden_size;
  absl::Status status = CatchTorchErrors("reading adapter tensors", [&] {
    if (config.method != AdapterMethod::kLora) {
      POLLEN_ASSIGN_OR_RETURN(
          adapters.prompt,
          ReadTensor(*file, kPromptName, {config.prefix_length, hidden},
                     device));
    }
    if (config.method == AdapterMethod::kDeepPrompt) {
      POLLEN_ASSIGN_OR_RETURN(
          adapters.deep_prompt,
          ReadTensor(*file, kDeepPromptName,
                     {model.num_hidden_layers, config.prefix_length, hidden},
                     device));
    }
    if (config.method == AdapterMethod::kLora) {
      for (int block = 0; block < model.num_hidden_layers; ++block) {
        for (const std::string& target : config.lora_targets) {
          POLLEN_ASSIGN_OR_RETURN(auto shape, ProjectionShape(model, target));
          LoraPair pair;
          POLLEN_ASSIGN_OR_RETURN(
              pair.a, ReadTensor(*file, LoraTensorName(block, target, "lora_A"),
                                 {config.lora_rank, shape.first}, device));
          POLLEN_ASSIGN_OR_RETURN(
              pair.b, ReadTensor(*file, LoraTensorName(block, target, "lora_B"),
                                 {shape.second, config.lora_rank}, device));
          adapters.lora[block][target] = std::move(pair);
        }
      }
    }
    if (config.train_head) {
      POLLEN_ASSIGN_OR_RETURN(adapters.norm,
                              ReadTensor(*file, kNormName, {hidden}, device));
      POLLEN_ASSIGN_OR_RETURN(
          adapters.lm_head,
          ReadTensor(*file, kLmHeadName, {model.vocab_size, hidden}, device));
    }
    return absl::OkStatus();
  });
  POLLEN_RETURN_IF_ERROR(status);
  for (const at::Tensor& parameter : adapters.Parameters()) {
    parameter.set_requires_grad(true);
  }
  return adapters;
}

}  // namespace pollen::client
