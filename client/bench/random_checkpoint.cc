#include "client/bench/random_checkpoint.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/bench/safetensors_stream_writer.h"
#include "client/bench/synthetic_tokenizer.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::bench {
namespace {

namespace fs = std::filesystem;

// Hugging Face's initializer_range for Llama: the standard deviation of
// linear and embedding weights at initialization.
constexpr double kInitializerRange = 0.02;
constexpr double kRmsNormEps = 1e-5;
constexpr double kRopeTheta = 10000;

// The output mixing function of the SplitMix64 generator.
uint64_t Mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// SplitMix64's state increment.
constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;

// 64-bit FNV-1a hash of a tensor name.
uint64_t HashName(const std::string& name) {
  uint64_t hash = 0xCBF29CE484222325ULL;
  for (const char c : name) {
    hash = (hash ^ static_cast<unsigned char>(c)) * 0x100000001B3ULL;
  }
  return hash;
}

// Uniform double in (0, 1) from the top 53 bits.
double ToOpenUnit(uint64_t bits) {
  return (static_cast<double>(bits >> 11) + 0.5) * 0x1.0p-53;
}

// Returns float32 `shape` drawn from N(0, stddev^2). Element i depends only
// on `key` and i (a counter-based SplitMix64 stream through Box-Muller), so
// the result is the same for any number of threads.
at::Tensor RandomNormal(const std::vector<int64_t>& shape, uint64_t key,
                        double stddev) {
  at::Tensor tensor = at::empty(shape, at::kFloat);
  float* data = tensor.data_ptr<float>();
  const int64_t count = tensor.numel();
  const int64_t pairs = (count + 1) / 2;
  constexpr int64_t kGrainPairs = 1 << 14;
  at::parallel_for(0, pairs, kGrainPairs, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const uint64_t counter = key + 2 * static_cast<uint64_t>(pair) * kGoldenGamma;
      const double u1 = ToOpenUnit(Mix64(counter));
      const double u2 = ToOpenUnit(Mix64(counter + kGoldenGamma));
      const double radius = stddev * std::sqrt(-2.0 * std::log(u1));
      const double angle = 2.0 * M_PI * u2;
      data[2 * pair] = static_cast<float>(radius * std::cos(angle));
      if (2 * pair + 1 < count) {
        data[2 * pair + 1] = static_cast<float>(radius * std::sin(angle));
      }
    }
  });
  return tensor;
}

at::ScalarType ToScalarType(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF32:
      return at::kFloat;
    case SafetensorsDtype::kF16:
      return at::kHalf;
    case SafetensorsDtype::kBF16:
      return at::kBFloat16;
  }
  return at::kFloat;
}

const char* TorchDtypeName(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF32:
      return "float32";
    case SafetensorsDtype::kF16:
      return "float16";
    case SafetensorsDtype::kBF16:
      return "bfloat16";
  }
  return "float32";
}

// A tensor to write: its spec, and whether it is a norm weight (all ones).
struct PlannedTensor {
  TensorSpec spec;
  bool is_norm = false;
};

// Every tensor of the checkpoint in Hugging Face's order: embeddings,
// blocks, final norm, LM head.
std::vector<PlannedTensor> PlanTensors(const ModelConfig& config,
                                       SafetensorsDtype dtype) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  const int64_t intermediate = config.intermediate_size;

  std::vector<PlannedTensor> tensors;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool is_norm) {
    tensors.push_back({TensorSpec{std::move(name), dtype, std::move(shape)},
                       is_norm});
  };
  add("model.embed_tokens.weight", {config.vocab_size, hidden}, false);
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    const std::string prefix = absl::StrCat("model.layers.", layer, ".");
    add(prefix + "input_layernorm.weight", {hidden}, true);
    add(prefix + "self_attn.q_proj.weight", {q_out, hidden}, false);
    add(prefix + "self_attn.k_proj.weight", {kv_out, hidden}, false);
    add(prefix + "self_attn.v_proj.weight", {kv_out, hidden}, false);
    add(prefix + "self_attn.o_proj.weight", {hidden, q_out}, false);
    add(prefix + "post_attention_layernorm.weight", {hidden}, true);
    add(prefix + "mlp.gate_proj.weight", {intermediate, hidden}, false);
    add(prefix + "mlp.up_proj.weight", {intermediate, hidden}, false);
    add(prefix + "mlp.down_proj.weight", {hidden, intermediate}, false);
  }
  add("model.norm.weight", {hidden}, true);
  add("lm_head.weight", {config.vocab_size, hidden}, false);
  return tensors;
}

// Splits `tensors` in order into shards of at most `shard_bytes`, except
// that a larger tensor gets a shard of its own.
std::vector<std::vector<PlannedTensor>> PlanShards(
    std::vector<PlannedTensor> tensors, int64_t shard_bytes) {
  std::vector<std::vector<PlannedTensor>> shards(1);
  int64_t shard_size = 0;
  for (PlannedTensor& tensor : tensors) {
    const int64_t bytes = tensor.spec.ByteSize();
    if (!shards.back().empty() && shard_size + bytes > shard_bytes) {
      shards.emplace_back();
      shard_size = 0;
    }
    shards.back().push_back(std::move(tensor));
    shard_size += bytes;
  }
  return shards;
}

nlohmann::json ConfigJson(const CheckpointShape& shape, int64_t num_layers,
                          SafetensorsDtype dtype) {
  return {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_act", "silu"},
      {"hidden_size", shape.hidden_size},
      {"intermediate_size", shape.intermediate_size},
      {"num_attention_heads", shape.num_attention_heads},
      {"num_key_value_heads", shape.num_key_value_heads},
      {"num_hidden_layers", num_layers},
      {"vocab_size", shape.vocab_size},
      {"max_position_embeddings", shape.max_position_embeddings},
      {"rms_norm_eps", kRmsNormEps},
      {"rope_theta", kRopeTheta},
      {"initializer_range", kInitializerRange},
      {"tie_word_embeddings", false},
      {"attention_bias", false},
      {"torch_dtype", TorchDtypeName(dtype)},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
  };
}

absl::Status WriteTextFile(const fs::path& path, const std::string& text) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(text.data(), static_cast<std::streamsize>(text.size()));
  file.close();
  if (!file) {
    return absl::InternalError(absl::StrCat("writing ", path.string(), " failed"));
  }
  return absl::OkStatus();
}

// Creates `dir`, or accepts it when it exists and is empty.
absl::Status PrepareEmptyFolder(const std::string& dir) {
  std::error_code error;
  if (fs::exists(dir, error)) {
    if (!fs::is_directory(dir, error) || !fs::is_empty(dir, error)) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, " exists and is not an empty folder; remove it or choose "
               "another --out"));
    }
    return absl::OkStatus();
  }
  fs::create_directories(dir, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("creating folder ", dir, " failed: ", error.message()));
  }
  return absl::OkStatus();
}

// Writes one safetensors file, generating each tensor just before it is
// written.
absl::Status WriteShard(const fs::path& path,
                        const std::vector<PlannedTensor>& tensors,
                        SafetensorsDtype dtype, uint64_t seed) {
  std::vector<TensorSpec> specs;
  for (const PlannedTensor& tensor : tensors) specs.push_back(tensor.spec);
  POLLEN_ASSIGN_OR_RETURN(
      std::unique_ptr<SafetensorsStreamWriter> writer,
      SafetensorsStreamWriter::Create(path.string(), std::move(specs),
                                      {{"format", "pt"}}));
  for (const PlannedTensor& tensor : tensors) {
    at::Tensor values;
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("generating tensor ", tensor.spec.name), [&] {
          values = tensor.is_norm
                       ? at::ones(tensor.spec.shape, at::kFloat)
                       : RandomNormal(tensor.spec.shape,
                                      Mix64(seed ^ HashName(tensor.spec.name)),
                                      kInitializerRange);
          values = values.to(ToScalarType(dtype));
          return absl::OkStatus();
        }));
    POLLEN_RETURN_IF_ERROR(writer->Append(values));
  }
  return writer->Finish();
}

}  // namespace

const std::vector<CheckpointShape>& KnownCheckpointShapes() {
  static const std::vector<CheckpointShape> shapes = {
      // TinyLlama/TinyLlama-1.1B-Chat-v1.0.
      {"tinyllama-1.1b", 2048, 5632, 32, 4, 22, 32000, 2048},
      // meta-llama/Llama-2-7b-hf.
      {"llama2-7b", 4096, 11008, 32, 32, 32, 32000, 4096},
      // meta-llama/Llama-2-70b-hf.
      {"llama2-70b", 8192, 28672, 64, 8, 80, 32000, 4096},
      // Small enough for unit tests; stories260k's block dimensions.
      {"test-tiny", 64, 172, 8, 4, 2, 512, 512},
  };
  return shapes;
}

absl::StatusOr<CheckpointShape> FindCheckpointShape(const std::string& name) {
  std::vector<std::string> names;
  for (const CheckpointShape& shape : KnownCheckpointShapes()) {
    if (shape.name == name) return shape;
    names.push_back(shape.name);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown shape '", name, "'; use one of ", absl::StrJoin(names, ", ")));
}

absl::StatusOr<RandomCheckpointSummary> WriteRandomCheckpoint(
    const RandomCheckpointOptions& options) {
  // Check the options, then the configuration as Pollen will read it.
  const CheckpointShape& shape = options.shape;
  const int64_t num_layers =
      options.num_layers == 0 ? shape.num_hidden_layers : options.num_layers;
  if (num_layers < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the number of layers must be at least 1, got ", options.num_layers));
  }
  if (options.shard_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shard size must be positive, got ", options.shard_bytes, " bytes"));
  }
  const std::string config_text =
      ConfigJson(shape, num_layers, options.dtype).dump(2) + "\n";
  POLLEN_ASSIGN_OR_RETURN(ModelConfig config,
                          ParseModelConfig(config_text, shape.name));
  POLLEN_ASSIGN_OR_RETURN(
      const client::SentencePieceModel tokenizer,
      MakeSyntheticBpeModel(static_cast<int>(shape.vocab_size)));
  POLLEN_RETURN_IF_ERROR(PrepareEmptyFolder(options.out_dir));
  const fs::path dir(options.out_dir);

  // config.json and tokenizer.model.
  POLLEN_RETURN_IF_ERROR(WriteTextFile(dir / "config.json", config_text));
  POLLEN_RETURN_IF_ERROR(WriteTextFile(dir / "tokenizer.model",
                                       SerializeSentencePieceModel(tokenizer)));

  // Plan the weight files.
  std::vector<PlannedTensor> tensors = PlanTensors(config, options.dtype);
  RandomCheckpointSummary summary;
  summary.config = config;
  summary.num_tensors = static_cast<int64_t>(tensors.size());
  for (const PlannedTensor& tensor : tensors) {
    summary.weight_bytes += tensor.spec.ByteSize();
  }
  const std::vector<std::vector<PlannedTensor>> shards =
      PlanShards(std::move(tensors), options.shard_bytes);
  for (size_t i = 0; i < shards.size(); ++i) {
    summary.weight_files.push_back(
        shards.size() == 1 ? std::string("model.safetensors")
                           : absl::StrFormat("model-%05d-of-%05d.safetensors",
                                             i + 1, shards.size()));
  }
  POLLEN_LOG_INFO(
      "writing a random {} checkpoint ({} layers, {}, seed {}) to {}: {} "
      "tensors, {} bytes in {} file(s)",
      shape.name, num_layers, TorchDtypeName(options.dtype), options.seed,
      options.out_dir, summary.num_tensors, summary.weight_bytes, shards.size());

  // Write them, and the index when there are several.
  nlohmann::json weight_map = nlohmann::json::object();
  int64_t bytes_done = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string& file_name = summary.weight_files[i];
    POLLEN_RETURN_IF_ERROR(
        WriteShard(dir / file_name, shards[i], options.dtype, options.seed));
    for (const PlannedTensor& tensor : shards[i]) {
      weight_map[tensor.spec.name] = file_name;
      bytes_done += tensor.spec.ByteSize();
    }
    if (options.on_file_written) {
      options.on_file_written(file_name, bytes_done, summary.weight_bytes);
    }
  }
  if (shards.size() > 1) {
    const nlohmann::json index = {
        {"metadata", {{"total_size", summary.weight_bytes}}},
        {"weight_map", weight_map}};
    POLLEN_RETURN_IF_ERROR(WriteTextFile(dir / "model.safetensors.index.json",
                                         index.dump(2) + "\n"));
  }
  POLLEN_LOG_INFO("wrote {}", options.out_dir);
  return summary;
}

}  // namespace pollen::bench
