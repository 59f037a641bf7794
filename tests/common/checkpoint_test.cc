#include "common/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/support/checkpoint_fixtures.h"
#include "tests/support/test_support.h"

namespace pollen {
namespace {

namespace fs = std::filesystem;
using ::pollen::testing::MakeShardedCopy;
using ::pollen::testing::Stories260kDir;
using ::pollen::testing::TempDir;

TEST(Checkpoint, OpensStories260k) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->dir(), Stories260kDir());
  EXPECT_EQ((*checkpoint)->config().num_hidden_layers, 5);
  EXPECT_EQ((*checkpoint)->TensorNames().size(), 47u);
  EXPECT_TRUE((*checkpoint)->HasTensor("model.embed_tokens.weight"));
  EXPECT_TRUE((*checkpoint)->HasTensor("model.layers.4.mlp.down_proj.weight"));
  EXPECT_FALSE((*checkpoint)->HasTensor("lm_head.weight"));
}

TEST(Checkpoint, LoadTensorConverts) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto f32 = (*checkpoint)->LoadTensor("model.norm.weight", at::kFloat,
                                       at::kCPU, {64});
  ASSERT_TRUE(f32.ok()) << f32.status();
  EXPECT_EQ(f32->scalar_type(), at::kFloat);
  EXPECT_TRUE(f32->is_contiguous());

  auto bf16 = (*checkpoint)->LoadTensor("model.norm.weight", at::kBFloat16,
                                        at::kCPU);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(bf16->scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::allclose(bf16->to(at::kFloat), *f32, 1e-2, 1e-2));
}

TEST(Checkpoint, LoadTensorIsCopy) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  at::Tensor first =
      *(*checkpoint)->LoadTensor("model.norm.weight", at::kFloat, at::kCPU);
  first.fill_(0);  // the mapping is read-only, so this must be a copy
  const at::Tensor second =
      *(*checkpoint)->LoadTensor("model.norm.weight", at::kFloat, at::kCPU);
  EXPECT_FALSE(at::equal(first, second));
}

TEST(Checkpoint, ShapeMismatch) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const absl::Status status =
      (*checkpoint)
          ->LoadTensor("model.embed_tokens.weight", at::kFloat, at::kCPU,
                       {64, 512})
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("has shape [512, 64], expected [64, 512]"),
            absl::string_view::npos)
      << status;
  EXPECT_NE(status.message().find("model.safetensors"), absl::string_view::npos)
      << status;
}

TEST(Checkpoint, MissingTensor) {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const absl::Status status =
      (*checkpoint)->LoadTensor("lm_head.weight", at::kFloat, at::kCPU).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("'lm_head.weight'"), absl::string_view::npos)
      << status;
}

TEST(Checkpoint, MissingDirectory) {
  TempDir dir;
  const absl::Status status =
      Checkpoint::Open(dir.path() + "/absent").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("absent"), absl::string_view::npos)
      << status;
}

TEST(Checkpoint, MissingConfig) {
  TempDir dir;
  const absl::Status status = Checkpoint::Open(dir.path()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("config.json"), absl::string_view::npos)
      << status;
}

TEST(Checkpoint, MissingWeights) {
  TempDir dir;
  fs::copy_file(Stories260kDir() + "/config.json", dir.path() + "/config.json");
  const absl::Status status = Checkpoint::Open(dir.path()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("model.safetensors.index.json"),
            absl::string_view::npos)
      << status;
}

TEST(Checkpoint, MalformedIndex) {
  TempDir dir;
  fs::copy_file(Stories260kDir() + "/config.json", dir.path() + "/config.json");
  std::ofstream(dir.path() + "/model.safetensors.index.json")
      << R"({"weight_map": {"x": "../elsewhere.safetensors"}})";
  const absl::Status status = Checkpoint::Open(dir.path()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("../elsewhere.safetensors"),
            absl::string_view::npos)
      << status;
}

TEST(Checkpoint, ShardedCopyMatches) {
  TempDir dir;
  auto shards = MakeShardedCopy(Stories260kDir(), dir.path());
  ASSERT_TRUE(shards.ok()) << shards.status();
  ASSERT_EQ(shards->size(), 6u);
  EXPECT_EQ((*shards)[0], "model-00001-of-00006.safetensors");
  EXPECT_EQ((*shards)[5], "model-00006-of-00006.safetensors");
  EXPECT_TRUE(fs::exists(dir.path() + "/tokenizer.model"));
  EXPECT_FALSE(fs::exists(dir.path() + "/model.safetensors"));

  auto single = Checkpoint::Open(Stories260kDir());
  ASSERT_TRUE(single.ok()) << single.status();
  auto sharded = Checkpoint::Open(dir.path());
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  ASSERT_EQ((*sharded)->TensorNames(), (*single)->TensorNames());
  for (const std::string& name : (*single)->TensorNames()) {
    auto expected = (*single)->LoadTensor(name, at::kFloat, at::kCPU);
    auto actual = (*sharded)->LoadTensor(name, at::kFloat, at::kCPU);
    ASSERT_TRUE(expected.ok()) << expected.status();
    ASSERT_TRUE(actual.ok()) << actual.status();
    EXPECT_TRUE(at::equal(*actual, *expected)) << name;
  }
}

TEST(Checkpoint, OpensWithoutShards) {
  TempDir dir;
  auto shards = MakeShardedCopy(Stories260kDir(), dir.path());
  ASSERT_TRUE(shards.ok()) << shards.status();
  fs::remove(dir.path() + "/" + (*shards)[0]);

  // Open reads only the index, so a missing shard fails only when loaded.
  auto checkpoint = Checkpoint::Open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_TRUE((*checkpoint)
                  ->LoadTensor("model.layers.1.input_layernorm.weight",
                               at::kFloat, at::kCPU)
                  .ok());
  const absl::Status status =
      (*checkpoint)
          ->LoadTensor("model.layers.0.input_layernorm.weight", at::kFloat,
                       at::kCPU)
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find((*shards)[0]), absl::string_view::npos)
      << status;
  EXPECT_NE(status.message().find("model.layers.0.input_layernorm.weight"),
            absl::string_view::npos)
      << status;
}

}  // namespace
}  // namespace pollen
