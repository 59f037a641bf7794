// Random benchmark checkpoints: their files, shapes, determinism, tokenizer,
// and that Pollen's loaders run them.
#include "client/bench/random_checkpoint.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_format.h"
#include "client/bench/synthetic_tokenizer.h"
#include "client/model_head.h"
#include "client/sentencepiece_model.h"
#include "client/tokenizer.h"
#include "common/checkpoint.h"
#include "node/block_span.h"
#include "tests/support/test_support.h"

namespace pollen::bench {
namespace {

using pollen::testing::ReadFile;
using pollen::testing::TempDir;

RandomCheckpointOptions TinyOptions(const std::string& out_dir) {
  RandomCheckpointOptions options;
  options.shape = *FindCheckpointShape("test-tiny");
  options.out_dir = out_dir;
  return options;
}

// Every file of a folder by name, with its bytes.
std::map<std::string, std::string> FolderContents(const std::string& dir) {
  std::map<std::string, std::string> contents;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    contents[entry.path().filename().string()] = ReadFile(entry.path().string());
  }
  return contents;
}

TEST(SyntheticTokenizer, SerializedModelParsesBack) {
  auto model = MakeSyntheticBpeModel(1000);
  ASSERT_TRUE(model.ok()) << model.status();
  auto parsed = client::ParseSentencePieceModel(SerializeSentencePieceModel(*model));
  ASSERT_TRUE(parsed.ok()) << parsed.status();

  ASSERT_EQ(parsed->pieces.size(), 1000u);
  for (size_t i = 0; i < parsed->pieces.size(); ++i) {
    EXPECT_EQ(parsed->pieces[i].text, model->pieces[i].text) << i;
    EXPECT_EQ(parsed->pieces[i].score, model->pieces[i].score) << i;
    EXPECT_EQ(parsed->pieces[i].type, model->pieces[i].type) << i;
  }
  EXPECT_EQ(parsed->model_type, client::SentencePieceModelType::kBpe);
  EXPECT_TRUE(parsed->byte_fallback);
  EXPECT_EQ(parsed->normalizer_name, "identity");
  EXPECT_TRUE(parsed->add_dummy_prefix);
  EXPECT_FALSE(parsed->remove_extra_whitespaces);
  EXPECT_TRUE(parsed->escape_whitespaces);
  EXPECT_FALSE(parsed->has_denormalizer);
}

TEST(SyntheticTokenizer, LaysOutSpecialAndBytePiecesLikeLlama) {
  auto model = MakeSyntheticBpeModel(32000);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_EQ(model->pieces.size(), 32000u);
  EXPECT_EQ(model->pieces[0].text, "<unk>");
  EXPECT_EQ(model->pieces[1].text, "<s>");
  EXPECT_EQ(model->pieces[2].text, "</s>");
  EXPECT_EQ(model->pieces[3].text, "<0x00>");
  EXPECT_EQ(model->pieces[258].text, "<0xFF>");
  EXPECT_EQ(model->pieces[258].type, client::PieceType::kByte);
}

TEST(SyntheticTokenizer, RejectsVocabularyOutsideRange) {
  for (const int size : {0, 300, 40000}) {
    const auto model = MakeSyntheticBpeModel(size);
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument) << size;
    EXPECT_NE(model.status().message().find("must be in"), std::string::npos);
  }
}

TEST(SyntheticTokenizer, RoundTripsEnglishAndOtherText) {
  TempDir dir;
  const std::string path = dir.path() + "/tokenizer.model";
  auto model = MakeSyntheticBpeModel(32000);
  ASSERT_TRUE(model.ok()) << model.status();
  {
    std::ofstream file(path, std::ios::binary);
    file << SerializeSentencePieceModel(*model);
  }
  auto tokenizer = client::Tokenizer::Load(path);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->vocab_size(), 32000);
  EXPECT_EQ((*tokenizer)->bos_id(), 1);
  EXPECT_EQ((*tokenizer)->eos_id(), 2);

  const std::string english =
      "The quick brown fox jumps over the lazy dog. It was 12 o'clock!";
  const std::vector<int> ids = (*tokenizer)->Encode(english, false);
  EXPECT_EQ((*tokenizer)->Decode(ids), english);
  // Merged pieces: far fewer tokens than characters.
  EXPECT_LT(ids.size(), english.size() / 2) << ids.size();

  // Characters outside the alphabet go through byte fallback.
  for (const std::string text :
       {"caf\xC3\xA9 na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC", "tabs\tand\nlines",
        "  two  spaces  "}) {
    EXPECT_EQ((*tokenizer)->Decode((*tokenizer)->Encode(text, true)), text);
  }
}

TEST(RandomCheckpoint, WritesConfigAndTensorShapes) {
  TempDir dir;
  auto summary = WriteRandomCheckpoint(TinyOptions(dir.path() + "/model"));
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->weight_files, std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(summary->num_tensors, 2 + 2 * 9 + 1);

  auto checkpoint = Checkpoint::Open(dir.path() + "/model");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  EXPECT_EQ(config.model_type, "llama");
  EXPECT_EQ(config.hidden_size, 64);
  EXPECT_EQ(config.intermediate_size, 172);
  EXPECT_EQ(config.num_attention_heads, 8);
  EXPECT_EQ(config.num_key_value_heads, 4);
  EXPECT_EQ(config.num_hidden_layers, 2);
  EXPECT_EQ(config.vocab_size, 512);
  EXPECT_EQ(config.max_position_embeddings, 512);
  EXPECT_DOUBLE_EQ(config.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(config.rope_theta, 10000);
  EXPECT_FALSE(config.tie_word_embeddings);
  EXPECT_EQ(config.torch_dtype, "float32");

  const std::map<std::string, std::vector<int64_t>> expected = {
      {"model.embed_tokens.weight", {512, 64}},
      {"model.layers.1.input_layernorm.weight", {64}},
      {"model.layers.1.self_attn.q_proj.weight", {64, 64}},
      {"model.layers.1.self_attn.k_proj.weight", {32, 64}},
      {"model.layers.1.self_attn.v_proj.weight", {32, 64}},
      {"model.layers.1.self_attn.o_proj.weight", {64, 64}},
      {"model.layers.1.post_attention_layernorm.weight", {64}},
      {"model.layers.1.mlp.gate_proj.weight", {172, 64}},
      {"model.layers.1.mlp.up_proj.weight", {172, 64}},
      {"model.layers.1.mlp.down_proj.weight", {64, 172}},
      {"model.norm.weight", {64}},
      {"lm_head.weight", {512, 64}},
  };
  for (const auto& [name, shape] : expected) {
    auto tensor = (*checkpoint)->LoadTensor(name, at::kFloat, at::kCPU, shape);
    EXPECT_TRUE(tensor.ok()) << name << ": " << tensor.status();
  }
}

TEST(RandomCheckpoint, DrawsLinearWeightsAndSetsNormsToOne) {
  TempDir dir;
  RandomCheckpointOptions options = TinyOptions(dir.path() + "/model");
  options.shape.hidden_size = 256;  // enough values for the statistics
  ASSERT_TRUE(WriteRandomCheckpoint(options).ok());
  auto checkpoint = Checkpoint::Open(options.out_dir);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();

  auto norm = (*checkpoint)->LoadTensor("model.layers.0.input_layernorm.weight",
                                        at::kFloat, at::kCPU);
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_TRUE(at::all(*norm == 1).item<bool>());

  auto weight = (*checkpoint)->LoadTensor("model.layers.0.mlp.up_proj.weight",
                                          at::kFloat, at::kCPU);
  ASSERT_TRUE(weight.ok()) << weight.status();
  EXPECT_NEAR(weight->mean().item<double>(), 0, 0.001);
  EXPECT_NEAR(weight->std().item<double>(), 0.02, 0.0005);
}

TEST(RandomCheckpoint, SameSeedGivesIdenticalBytes) {
  TempDir dir;
  RandomCheckpointOptions options = TinyOptions(dir.path() + "/a");
  options.seed = 7;
  ASSERT_TRUE(WriteRandomCheckpoint(options).ok());
  options.out_dir = dir.path() + "/b";
  ASSERT_TRUE(WriteRandomCheckpoint(options).ok());
  options.out_dir = dir.path() + "/c";
  options.seed = 8;
  ASSERT_TRUE(WriteRandomCheckpoint(options).ok());

  const auto a = FolderContents(dir.path() + "/a");
  const auto b = FolderContents(dir.path() + "/b");
  const auto c = FolderContents(dir.path() + "/c");
  EXPECT_EQ(a.size(), 3u);  // config.json, tokenizer.model, model.safetensors
  EXPECT_TRUE(a == b);
  EXPECT_NE(a.at("model.safetensors"), c.at("model.safetensors"));
  EXPECT_EQ(a.at("config.json"), c.at("config.json"));
}

TEST(RandomCheckpoint, BlockValuesDoNotDependOnLayerCount) {
  TempDir dir;
  RandomCheckpointOptions options = TinyOptions(dir.path() + "/one");
  options.num_layers = 1;
  ASSERT_TRUE(WriteRandomCheckpoint(options).ok());
  options.out_dir = dir.path() + "/two";
  options.num_layers = 2;
  ASSERT_TRUE(WriteRandomCheckpoint(options).ok());

  auto one_layer = Checkpoint::Open(dir.path() + "/one");
  ASSERT_TRUE(one_layer.ok()) << one_layer.status();
  auto two_layers = Checkpoint::Open(dir.path() + "/two");
  ASSERT_TRUE(two_layers.ok()) << two_layers.status();
  EXPECT_EQ((*one_layer)->config().num_hidden_layers, 1);
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  auto from_one = (*one_layer)->LoadTensor(name, at::kFloat, at::kCPU);
  ASSERT_TRUE(from_one.ok()) << from_one.status();
  auto from_two = (*two_layers)->LoadTensor(name, at::kFloat, at::kCPU);
  ASSERT_TRUE(from_two.ok()) << from_two.status();
  EXPECT_TRUE(at::equal(*from_one, *from_two));
}

TEST(RandomCheckpoint, ShardsWithIndexWhenLarge) {
  TempDir dir;
  RandomCheckpointOptions options = TinyOptions(dir.path() + "/model");
  options.shard_bytes = 100'000;  // the embeddings alone take 131,072 bytes
  auto summary = WriteRandomCheckpoint(options);
  ASSERT_TRUE(summary.ok()) << summary.status();
  ASSERT_GT(summary->weight_files.size(), 2u);
  EXPECT_EQ(summary->weight_files.front(), absl::StrFormat(
      "model-00001-of-%05d.safetensors", summary->weight_files.size()));

  const auto index = nlohmann::json::parse(
      ReadFile(options.out_dir + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), summary->weight_bytes);
  EXPECT_EQ(index["weight_map"]["model.embed_tokens.weight"],
            summary->weight_files.front());
  EXPECT_EQ(index["weight_map"]["lm_head.weight"], summary->weight_files.back());
  EXPECT_FALSE(std::filesystem::exists(options.out_dir + "/model.safetensors"));

  auto checkpoint = Checkpoint::Open(options.out_dir);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(static_cast<int64_t>((*checkpoint)->TensorNames().size()),
            summary->num_tensors);
  for (const std::string& name : (*checkpoint)->TensorNames()) {
    EXPECT_TRUE((*checkpoint)->LoadTensor(name, at::kFloat, at::kCPU).ok()) << name;
  }
}

TEST(RandomCheckpoint, WritesBfloat16) {
  TempDir dir;
  RandomCheckpointOptions options = TinyOptions(dir.path() + "/model");
  options.dtype = SafetensorsDtype::kBF16;
  auto summary = WriteRandomCheckpoint(options);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->config.torch_dtype, "bfloat16");

  auto file = SafetensorsFile::Open(options.out_dir + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsEntry* entry = (*file)->Find("lm_head.weight");
  ASSERT_NE(entry, nullptr);
  EXPECT_EQ(entry->dtype, SafetensorsDtype::kBF16);
  EXPECT_EQ(entry->end - entry->begin, 512u * 64 * 2);
}

TEST(RandomCheckpoint, RunsThroughBlockSpanAndHead) {
  TempDir dir;
  ASSERT_TRUE(WriteRandomCheckpoint(TinyOptions(dir.path() + "/model")).ok());
  auto checkpoint = Checkpoint::Open(dir.path() + "/model");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto head = client::ModelHead::Load(**checkpoint, at::kFloat, at::kCPU);
  ASSERT_TRUE(head.ok()) << head.status();
  auto span = node::BlockSpan::Load(**checkpoint, 0, 2, at::kFloat, at::kCPU);
  ASSERT_TRUE(span.ok()) << span.status();

  std::vector<node::LayerKvCache> cache = (*span)->AllocateCache(0, 2, 1, 16);
  const at::Tensor hidden = (*head)->Embed(at::arange(1, 9).reshape({1, 8}));
  auto output = (*span)->Forward(hidden, cache, 0, 0, 2);
  ASSERT_TRUE(output.ok()) << output.status();
  const at::Tensor logits = (*head)->Logits(*output);
  EXPECT_EQ(logits.sizes(), at::IntArrayRef({1, 8, 512}));
  EXPECT_TRUE(at::isfinite(logits).all().item<bool>());
}

TEST(RandomCheckpoint, RejectsNonEmptyFolderAndBadLayers) {
  TempDir dir;
  { std::ofstream(dir.path() + "/other.txt") << "keep me"; }
  auto written = WriteRandomCheckpoint(TinyOptions(dir.path()));
  EXPECT_EQ(written.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReadFile(dir.path() + "/other.txt"), "keep me");

  RandomCheckpointOptions options = TinyOptions(dir.path() + "/model");
  options.num_layers = -1;
  EXPECT_EQ(WriteRandomCheckpoint(options).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FindCheckpointShape("llama9").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pollen::bench
