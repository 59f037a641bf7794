// LoRA and deep prompts in LlamaBlock and BlockSpan, their gradients from
// RunBackward, and adapter parsing.
#include "node/adapters.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/checkpoint.h"
#include "common/tensor_codec.h"
#include "node/block_span.h"
#include "node/llama_block.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

using ::pollen::testing::Stories260kDir;

ModelConfig SmallConfig() {
  ModelConfig config;
  config.model_type = "llama";
  config.hidden_size = 32;
  config.intermediate_size = 48;
  config.num_hidden_layers = 1;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 2;
  config.head_dim = 8;
  config.vocab_size = 16;
  config.max_position_embeddings = 32;
  config.rms_norm_eps = 1e-5;
  return config;
}

LlamaBlockWeights RandomWeights(const ModelConfig& config) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  auto matrix = [&](const std::string& target) {
    const auto shape = LoraTargetShape(config, target);
    EXPECT_TRUE(shape.ok()) << shape.status();
    return at::randn({shape->first, shape->second}, options) * 0.2;
  };
  LlamaBlockWeights weights;
  weights.input_layernorm = 1 + 0.1 * at::randn({config.hidden_size}, options);
  weights.q_proj = matrix("q_proj");
  weights.k_proj = matrix("k_proj");
  weights.v_proj = matrix("v_proj");
  weights.o_proj = matrix("o_proj");
  weights.post_attention_layernorm =
      1 + 0.1 * at::randn({config.hidden_size}, options);
  weights.gate_proj = matrix("gate_proj");
  weights.up_proj = matrix("up_proj");
  weights.down_proj = matrix("down_proj");
  return weights;
}

// Random LoRA of `rank` on every target, in `dtype`.
BlockAdapter RandomLora(const ModelConfig& config, int64_t rank,
                        at::ScalarType dtype, double scaling = 0.5) {
  BlockAdapter adapter;
  for (const char* target : kLoraTargets) {
    const auto shape = LoraTargetShape(config, target);
    EXPECT_TRUE(shape.ok()) << shape.status();
    adapter.lora[target] =
        LoraAdapter{at::randn({rank, shape->second}).to(dtype) * 0.1,
                    at::randn({shape->first, rank}).to(dtype) * 0.1, scaling};
  }
  return adapter;
}

at::Tensor& Field(LlamaBlockWeights& weights, const std::string& target) {
  if (target == "q_proj") return weights.q_proj;
  if (target == "k_proj") return weights.k_proj;
  if (target == "v_proj") return weights.v_proj;
  if (target == "o_proj") return weights.o_proj;
  if (target == "gate_proj") return weights.gate_proj;
  if (target == "up_proj") return weights.up_proj;
  return weights.down_proj;
}

double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

class LlamaBlockAdapterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::manual_seed(7);
    config_ = SmallConfig();
    weights_ = RandomWeights(config_);
    rotary_ = std::make_shared<RotaryEmbedding>(config_, 32, at::kDouble,
                                                at::kCPU);
    block_ = std::make_unique<LlamaBlock>(0, config_, weights_, rotary_);
    hidden_ = at::randn({2, 6, config_.hidden_size}, at::kDouble);
  }

  ModelConfig config_;
  LlamaBlockWeights weights_;
  std::shared_ptr<const RotaryEmbedding> rotary_;
  std::unique_ptr<LlamaBlock> block_;
  at::Tensor hidden_;  // [2, 6, hidden]
};

TEST_F(LlamaBlockAdapterTest, NoCacheMatchesCache) {
  LayerKvCache cache{at::zeros({2, 2, 6, 8}, at::kDouble),
                     at::zeros({2, 2, 6, 8}, at::kDouble)};
  const at::Tensor cached = block_->Forward(hidden_, cache, 0);
  EXPECT_LT(MaxDiff(block_->ForwardNoCache(hidden_, nullptr), cached), 1e-12);
}

TEST_F(LlamaBlockAdapterTest, LoraEqualsMergedWeights) {
  const BlockAdapter adapter = RandomLora(config_, 3, at::kDouble);
  LlamaBlockWeights merged = weights_;
  for (const auto& [target, lora] : adapter.lora) {
    Field(merged, target) =
        Field(merged, target) + lora.scaling * at::matmul(lora.b, lora.a);
  }
  const LlamaBlock merged_block(0, config_, merged, rotary_);

  EXPECT_LT(MaxDiff(block_->ForwardNoCache(hidden_, &adapter),
                    merged_block.ForwardNoCache(hidden_, nullptr)),
            1e-12);

  // The cached path applies the same LoRA.
  LayerKvCache cache{at::zeros({2, 2, 6, 8}, at::kDouble),
                     at::zeros({2, 2, 6, 8}, at::kDouble)};
  const at::Tensor first =
      block_->Forward(hidden_.narrow(1, 0, 4), cache, 0, &adapter);
  const at::Tensor second =
      block_->Forward(hidden_.narrow(1, 4, 2), cache, 4, &adapter);
  EXPECT_LT(MaxDiff(at::cat({first, second}, 1),
                    merged_block.ForwardNoCache(hidden_, nullptr)),
            1e-12);
}

TEST_F(LlamaBlockAdapterTest, ZeroLoraKeepsOutputs) {
  BlockAdapter adapter = RandomLora(config_, 2, at::kDouble);
  for (auto& [target, lora] : adapter.lora) lora.b = at::zeros_like(lora.b);
  EXPECT_LT(MaxDiff(block_->ForwardNoCache(hidden_, &adapter),
                    block_->ForwardNoCache(hidden_, nullptr)),
            1e-14);
}

TEST_F(LlamaBlockAdapterTest, PromptAddsAtFirstPositions) {
  BlockAdapter adapter;
  adapter.prompt = at::randn({1, 2, config_.hidden_size}, at::kDouble);
  at::Tensor prompted = hidden_.clone();
  prompted.narrow(1, 0, 2).add_(adapter.prompt);
  EXPECT_LT(MaxDiff(block_->ForwardNoCache(hidden_, &adapter),
                    block_->ForwardNoCache(prompted, nullptr)),
            1e-12);

  // The input tensor is left as it was.
  EXPECT_GT(MaxDiff(prompted, hidden_), 0.0);
  // A per-sequence prompt [batch, prefix, hidden] works too.
  adapter.prompt = at::randn({2, 3, config_.hidden_size}, at::kDouble);
  prompted = hidden_.clone();
  prompted.narrow(1, 0, 3).add_(adapter.prompt);
  EXPECT_LT(MaxDiff(block_->ForwardNoCache(hidden_, &adapter),
                    block_->ForwardNoCache(prompted, nullptr)),
            1e-12);
}

TEST_F(LlamaBlockAdapterTest, PromptLongerThanSequenceThrows) {
  BlockAdapter adapter;
  adapter.prompt = at::randn({1, 7, config_.hidden_size}, at::kDouble);
  EXPECT_THROW(block_->ForwardNoCache(hidden_, &adapter), c10::Error);
}

// Blocks 1..4 of stories260k with prompts and LoRA on two of them.
class RunBackwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::manual_seed(11);
    auto checkpoint = Checkpoint::Open(Stories260kDir());
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    checkpoint_ = *checkpoint;
    auto span = BlockSpan::Load(*checkpoint_, 1, 4, at::kFloat, at::kCPU);
    ASSERT_TRUE(span.ok()) << span.status();
    span_ = std::move(*span);

    const ModelConfig& config = span_->config();
    inputs_ = at::randn({2, 5, config.hidden_size});
    grad_outputs_ = at::randn({2, 5, config.hidden_size});
    adapters_[1].prompt = at::randn({1, 2, config.hidden_size}) * 0.5;
    adapters_[1].lora["q_proj"] =
        LoraAdapter{at::randn({4, 64}) * 0.1, at::randn({64, 4}) * 0.1, 2.0};
    adapters_[3].lora["down_proj"] =
        LoraAdapter{at::randn({2, 172}) * 0.1, at::randn({64, 2}) * 0.1, 0.5};
    adapters_[3].lora["v_proj"] =
        LoraAdapter{at::randn({3, 64}) * 0.1, at::randn({32, 3}) * 0.1, 1.0};
    adapters_[3].prompt = at::randn({2, 3, config.hidden_size}) * 0.5;
  }

  // Tensors of `adapters` in a fixed order: per block, prompt then a, b of
  // each target.
  static std::vector<at::Tensor> Flatten(
      const std::map<int, BlockAdapter>& adapters) {
    std::vector<at::Tensor> tensors;
    for (const auto& [block, adapter] : adapters) {
      if (adapter.prompt.defined()) tensors.push_back(adapter.prompt);
      for (const auto& [target, lora] : adapter.lora) {
        tensors.push_back(lora.a);
        tensors.push_back(lora.b);
      }
    }
    return tensors;
  }

  // sum(outputs * grad_outputs) through double-precision copies of the
  // blocks, for finite differences.
  double Loss(const at::Tensor& inputs,
              const std::map<int, BlockAdapter>& adapters) {
    auto rotary = std::make_shared<RotaryEmbedding>(span_->config(), 16,
                                                    at::kDouble, at::kCPU);
    at::Tensor state = inputs.to(at::kDouble);
    for (int index = 1; index < 4; ++index) {
      auto block =
          LlamaBlock::Load(*checkpoint_, index, at::kDouble, at::kCPU, rotary);
      EXPECT_TRUE(block.ok()) << block.status();
      const auto it = adapters.find(index);
      state = block->ForwardNoCache(
          state, it == adapters.end() ? nullptr : &it->second);
    }
    return (state * grad_outputs_.to(at::kDouble)).sum().item<double>();
  }

  std::shared_ptr<const Checkpoint> checkpoint_;
  std::unique_ptr<BlockSpan> span_;
  at::Tensor inputs_;        // [2, 5, 64]
  at::Tensor grad_outputs_;  // [2, 5, 64]
  std::map<int, BlockAdapter> adapters_;
};

TEST_F(RunBackwardTest, MatchesAutograd) {
  auto result = RunBackward(*span_, 1, 4, inputs_, adapters_, grad_outputs_);
  ASSERT_TRUE(result.ok()) << result.status();

  // The same pass with plain autograd.
  const at::Tensor inputs = inputs_.clone().requires_grad_(true);
  std::map<int, BlockAdapter> adapters = adapters_;
  for (auto& [block, adapter] : adapters) {
    if (adapter.prompt.defined()) {
      adapter.prompt = adapter.prompt.clone().requires_grad_(true);
    }
    for (auto& [target, lora] : adapter.lora) {
      lora.a = lora.a.clone().requires_grad_(true);
      lora.b = lora.b.clone().requires_grad_(true);
    }
  }
  auto outputs = span_->ForwardNoCache(inputs, 1, 4, adapters);
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  outputs->backward(grad_outputs_);

  EXPECT_TRUE(at::allclose(result->grad_inputs, inputs.grad(), 1e-5, 1e-6));
  const std::vector<at::Tensor> expected = Flatten(adapters);
  const std::vector<at::Tensor> actual = Flatten(result->grad_adapters);
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_TRUE(at::allclose(actual[i], expected[i].grad(), 1e-5, 1e-6))
        << "tensor " << i;
  }

  // The arguments are untouched and need no grad.
  EXPECT_FALSE(inputs_.requires_grad());
  EXPECT_FALSE(adapters_[1].prompt.requires_grad());
}

TEST_F(RunBackwardTest, AgreesWithFiniteDifferences) {
  auto result = RunBackward(*span_, 1, 4, inputs_, adapters_, grad_outputs_);
  ASSERT_TRUE(result.ok()) << result.status();
  // RmsNorm statistics and softmax run in float32 even in float64 blocks,
  // so a larger step keeps their rounding out of the differences.
  const double eps = 1e-2;

  // d loss / d inputs[1, 3, 10]: position 3 sits after the prompts.
  // d loss / d inputs[0, 0, 5]: position 0 carries both prompts.
  for (const std::vector<int64_t>& index :
       std::vector<std::vector<int64_t>>{{1, 3, 10}, {0, 0, 5}}) {
    at::Tensor up = inputs_.to(at::kDouble).clone();
    at::Tensor down = up.clone();
    up[index[0]][index[1]][index[2]] += eps;
    down[index[0]][index[1]][index[2]] -= eps;
    const double numeric = (Loss(up, adapters_) - Loss(down, adapters_)) / (2 * eps);
    const double analytic =
        result->grad_inputs[index[0]][index[1]][index[2]].item<double>();
    EXPECT_NEAR(analytic, numeric, 1e-3 * (1 + std::abs(numeric)));
  }

  // One coordinate each of a prompt, a LoRA a and a LoRA b.
  auto perturbed = [&](double delta, int which) {
    std::map<int, BlockAdapter> adapters;
    for (const auto& [block, adapter] : adapters_) {
      BlockAdapter& copy = adapters[block];
      if (adapter.prompt.defined()) {
        copy.prompt = adapter.prompt.to(at::kDouble).clone();
      }
      for (const auto& [target, lora] : adapter.lora) {
        copy.lora[target] = LoraAdapter{lora.a.to(at::kDouble).clone(),
                                        lora.b.to(at::kDouble).clone(),
                                        lora.scaling};
      }
    }
    if (which == 0) adapters[1].prompt[0][1][7] += delta;
    if (which == 1) adapters[1].lora["q_proj"].a[2][9] += delta;
    if (which == 2) adapters[3].lora["down_proj"].b[5][1] += delta;
    return adapters;
  };
  const double analytic[] = {
      result->grad_adapters[1].prompt[0][1][7].item<double>(),
      result->grad_adapters[1].lora["q_proj"].a[2][9].item<double>(),
      result->grad_adapters[3].lora["down_proj"].b[5][1].item<double>()};
  for (int which = 0; which < 3; ++which) {
    const at::Tensor inputs = inputs_.to(at::kDouble);
    const double numeric = (Loss(inputs, perturbed(eps, which)) -
                            Loss(inputs, perturbed(-eps, which))) /
                           (2 * eps);
    EXPECT_NEAR(analytic[which], numeric, 1e-3 * (1 + std::abs(numeric)))
        << "coordinate " << which;
  }
}

TEST_F(RunBackwardTest, RejectsWrongGradShape) {
  auto result = RunBackward(*span_, 1, 4, inputs_, adapters_,
                            at::randn({2, 4, 64}));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RunBackwardTest, ForwardNoCacheRejectsRange) {
  auto outputs = span_->ForwardNoCache(inputs_, 0, 4, adapters_);
  EXPECT_EQ(outputs.status().code(), absl::StatusCode::kInvalidArgument);
}

// Adapter parsing, against stories260k's shapes.
class AdaptersProtoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.hidden_size = 64;
    config_.intermediate_size = 172;
    config_.num_attention_heads = 8;
    config_.num_key_value_heads = 4;
    config_.head_dim = 8;
    config_.num_hidden_layers = 5;
    config_.max_position_embeddings = 512;
  }

  // One block's adapters with a LoRA of `target`.
  static v1::BlockAdapters Lora(int block, const std::string& target,
                                std::vector<int64_t> a_shape,
                                std::vector<int64_t> b_shape) {
    v1::BlockAdapters proto;
    proto.set_block(block);
    v1::LoraWeights* lora = proto.add_lora();
    lora->set_target(target);
    lora->set_scaling(2);
    EXPECT_TRUE(TensorToProto(at::randn(a_shape), lora->mutable_a()).ok());
    EXPECT_TRUE(TensorToProto(at::randn(b_shape), lora->mutable_b()).ok());
    return proto;
  }

  absl::StatusOr<std::map<int, BlockAdapter>> Parse(
      const std::vector<v1::BlockAdapters>& blocks) {
    google::protobuf::RepeatedPtrField<v1::BlockAdapters> protos;
    for (const v1::BlockAdapters& block : blocks) *protos.Add() = block;
    return AdaptersFromProto(protos, config_, 1, 4, /*batch=*/2, /*seq_len=*/5);
  }

  static void ExpectInvalid(const absl::Status& status,
                            const std::string& fragment) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_NE(status.message().find(fragment), absl::string_view::npos)
        << status;
  }

  ModelConfig config_;
};

TEST_F(AdaptersProtoTest, RoundTrips) {
  v1::BlockAdapters block = Lora(2, "gate_proj", {4, 64}, {172, 4});
  ASSERT_TRUE(TensorToProto(at::randn({1, 3, 64}), block.mutable_prompt()).ok());
  auto parsed = Parse({block, Lora(3, "o_proj", {8, 64}, {64, 8})});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->size(), 2u);
  EXPECT_EQ((*parsed)[2].prompt.sizes(), at::IntArrayRef({1, 3, 64}));
  EXPECT_DOUBLE_EQ((*parsed)[2].lora["gate_proj"].scaling, 2.0);

  google::protobuf::RepeatedPtrField<v1::BlockAdapters> written;
  ASSERT_TRUE(AdaptersToProto(*parsed, &written).ok());
  auto again = AdaptersFromProto(written, config_, 1, 4, 2, 5);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(at::equal((*again)[3].lora["o_proj"].b,
                        (*parsed)[3].lora["o_proj"].b));
}

TEST_F(AdaptersProtoTest, UnknownTarget) {
  ExpectInvalid(Parse({Lora(2, "qkv_proj", {4, 64}, {96, 4})}).status(),
                "'qkv_proj' is unknown");
}

TEST_F(AdaptersProtoTest, RankMismatch) {
  ExpectInvalid(Parse({Lora(2, "q_proj", {4, 64}, {64, 3})}).status(),
                "block 2 LoRA q_proj b has shape [64, 3], expected [64, 4]");
}

TEST_F(AdaptersProtoTest, WrongInFeatures) {
  ExpectInvalid(Parse({Lora(2, "down_proj", {4, 64}, {64, 4})}).status(),
                "block 2 LoRA down_proj a has shape [4, 64], expected [rank, 172]");
}

TEST_F(AdaptersProtoTest, RankAboveMinimum) {
  ExpectInvalid(Parse({Lora(2, "k_proj", {33, 64}, {32, 33})}).status(),
                "1 <= rank <= 32");
}

TEST_F(AdaptersProtoTest, PromptLongerThanSequence) {
  v1::BlockAdapters block;
  block.set_block(1);
  ASSERT_TRUE(TensorToProto(at::randn({1, 6, 64}), block.mutable_prompt()).ok());
  ExpectInvalid(Parse({block}).status(), "block 1 prompt has shape [1, 6, 64]");
}

TEST_F(AdaptersProtoTest, PromptBatchMismatch) {
  v1::BlockAdapters block;
  block.set_block(1);
  ASSERT_TRUE(TensorToProto(at::randn({3, 2, 64}), block.mutable_prompt()).ok());
  ExpectInvalid(Parse({block}).status(), "expected [1 or 2");
}

TEST_F(AdaptersProtoTest, BlockOutsideRange) {
  ExpectInvalid(Parse({Lora(4, "q_proj", {4, 64}, {64, 4})}).status(),
                "block 4 are outside the requested blocks [1, 4)");
}

TEST_F(AdaptersProtoTest, DuplicateBlock) {
  ExpectInvalid(Parse({Lora(2, "q_proj", {4, 64}, {64, 4}),
                       Lora(2, "k_proj", {4, 64}, {32, 4})})
                    .status(),
                "appear twice");
}

TEST_F(AdaptersProtoTest, DuplicateTarget) {
  v1::BlockAdapters block = Lora(2, "q_proj", {4, 64}, {64, 4});
  *block.add_lora() = block.lora(0);
  ExpectInvalid(Parse({block}).status(), "two LoRA adapters for q_proj");
}

}  // namespace
}  // namespace pollen::node
