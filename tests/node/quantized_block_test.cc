// Blocks with int8 weights. They must match blocks whose float weights are
// the dequantised int8 weights to rounding, with and without LoRA adapters
// and through backward passes, and approximate float32 blocks. Also checks
// the bytes that int8 and bfloat16 blocks take.
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/checkpoint.h"
#include "common/safetensors.h"
#include "node/adapters.h"
#include "node/block_span.h"
#include "node/llama_block.h"
#include "node/quantized_linear.h"
#include "node/span_choice.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

using ::pollen::testing::Stories260kDir;
using ::pollen::testing::TempDir;

constexpr const char* kProjections[] = {"q_proj", "k_proj",    "v_proj",
                                        "o_proj", "gate_proj", "up_proj",
                                        "down_proj"};

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// max |a - b| / max |b|.
double RelativeDiff(const at::Tensor& a, const at::Tensor& b) {
  return MaxAbsDiff(a, b) / b.to(at::kDouble).abs().max().item<double>();
}

at::Tensor Dequantized(const at::Tensor& weight) {
  return DequantizeInt8(QuantizeInt8(weight), weight.scalar_type());
}

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
  auto matrix = [&](const char* target) {
    const auto shape = LoraTargetShape(config, target);
    EXPECT_TRUE(shape.ok()) << shape.status();
    return at::randn({shape->first, shape->second}) * 0.2;
  };
  LlamaBlockWeights weights;
  weights.input_layernorm = 1 + 0.1 * at::randn({config.hidden_size});
  weights.q_proj = matrix("q_proj");
  weights.k_proj = matrix("k_proj");
  weights.v_proj = matrix("v_proj");
  weights.o_proj = matrix("o_proj");
  weights.post_attention_layernorm = 1 + 0.1 * at::randn({config.hidden_size});
  weights.gate_proj = matrix("gate_proj");
  weights.up_proj = matrix("up_proj");
  weights.down_proj = matrix("down_proj");
  return weights;
}

// `weights` with every projection replaced by its dequantised int8 form.
LlamaBlockWeights DequantizedWeights(LlamaBlockWeights weights) {
  for (at::Tensor* projection :
       {&weights.q_proj, &weights.k_proj, &weights.v_proj, &weights.o_proj,
        &weights.gate_proj, &weights.up_proj, &weights.down_proj}) {
    *projection = Dequantized(*projection);
  }
  return weights;
}

BlockAdapter RandomLora(const ModelConfig& config, int64_t rank) {
  BlockAdapter adapter;
  for (const char* target : kLoraTargets) {
    const auto shape = LoraTargetShape(config, target);
    EXPECT_TRUE(shape.ok()) << shape.status();
    adapter.lora[target] =
        LoraAdapter{at::randn({rank, shape->second}) * 0.1,
                    at::randn({shape->first, rank}) * 0.1, 0.5};
  }
  return adapter;
}

LayerKvCache ZeroCache(const ModelConfig& config, int64_t batch,
                       int64_t length) {
  const std::vector<int64_t> shape = {batch, config.num_key_value_heads,
                                      length, config.head_dim};
  return LayerKvCache{at::zeros(shape), at::zeros(shape)};
}

class Int8LlamaBlockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::manual_seed(21);
    config_ = SmallConfig();
    const LlamaBlockWeights weights = RandomWeights(config_);
    rotary_ = std::make_shared<RotaryEmbedding>(config_, 32, at::kFloat,
                                                at::kCPU);
    int8_block_ = std::make_unique<LlamaBlock>(0, config_, weights, rotary_,
                                               Quantization::kInt8);
    reference_block_ = std::make_unique<LlamaBlock>(
        0, config_, DequantizedWeights(weights), rotary_);
    float_block_ = std::make_unique<LlamaBlock>(0, config_, weights, rotary_);
    hidden_ = at::randn({2, 7, config_.hidden_size});
  }

  // Prefill of 5 tokens, then 2 one-token decode steps, with a KV cache.
  static at::Tensor PrefillThenDecode(const LlamaBlock& block,
                                      const at::Tensor& hidden,
                                      const BlockAdapter* adapter) {
    at::NoGradGuard no_grad;
    LayerKvCache cache = ZeroCache(SmallConfig(), hidden.size(0), 8);
    std::vector<at::Tensor> outputs;
    outputs.push_back(
        block.Forward(hidden.narrow(1, 0, 5), cache, 0, adapter));
    for (int64_t position = 5; position < 7; ++position) {
      outputs.push_back(block.Forward(hidden.narrow(1, position, 1), cache,
                                      position, adapter));
    }
    return at::cat(outputs, 1);
  }

  ModelConfig config_;
  std::shared_ptr<const RotaryEmbedding> rotary_;
  std::unique_ptr<LlamaBlock> int8_block_;
  std::unique_ptr<LlamaBlock> reference_block_;  // dequantised weights
  std::unique_ptr<LlamaBlock> float_block_;      // original weights
  at::Tensor hidden_;                            // [2, 7, hidden]
};

TEST_F(Int8LlamaBlockTest, ReportsQuantizationAndDtype) {
  EXPECT_EQ(int8_block_->quantization(), Quantization::kInt8);
  EXPECT_EQ(int8_block_->dtype(), at::kFloat);
  EXPECT_EQ(reference_block_->quantization(), Quantization::kNone);
}

TEST_F(Int8LlamaBlockTest, MatchesDequantizedWeights) {
  const at::Tensor output = PrefillThenDecode(*int8_block_, hidden_, nullptr);
  const at::Tensor expected =
      PrefillThenDecode(*reference_block_, hidden_, nullptr);
  EXPECT_LT(MaxAbsDiff(output, expected), 1e-5);
}

TEST_F(Int8LlamaBlockTest, CloseToFloatWeights) {
  const at::Tensor output = PrefillThenDecode(*int8_block_, hidden_, nullptr);
  const at::Tensor expected = PrefillThenDecode(*float_block_, hidden_, nullptr);
  EXPECT_LT(RelativeDiff(output, expected), 0.02);
}

TEST_F(Int8LlamaBlockTest, LoraMatchesDequantizedWeights) {
  const BlockAdapter adapter = RandomLora(config_, 4);
  const at::Tensor output = PrefillThenDecode(*int8_block_, hidden_, &adapter);
  const at::Tensor expected =
      PrefillThenDecode(*reference_block_, hidden_, &adapter);
  EXPECT_LT(MaxAbsDiff(output, expected), 1e-5);

  // The adapter does change the output.
  const at::Tensor without = PrefillThenDecode(*int8_block_, hidden_, nullptr);
  EXPECT_GT(MaxAbsDiff(output, without), 1e-3);

  const at::Tensor no_cache = int8_block_->ForwardNoCache(hidden_, &adapter);
  EXPECT_LT(MaxAbsDiff(no_cache, expected), 1e-5);
}

// stories260k spans in several precisions.
class QuantizedSpanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto checkpoint = Checkpoint::Open(Stories260kDir());
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    checkpoint_ = *checkpoint;
  }

  std::unique_ptr<BlockSpan> LoadSpan(int start, int end, at::ScalarType dtype,
                                      Quantization quantization) {
    auto span = BlockSpan::Load(*checkpoint_, start, end, dtype, at::kCPU,
                                quantization);
    EXPECT_TRUE(span.ok()) << span.status();
    return span.ok() ? std::move(*span) : nullptr;
  }

  // A copy of the checkpoint in `dir` whose projections are replaced by
  // their dequantised int8 form.
  std::shared_ptr<const Checkpoint> WriteDequantizedCopy(
      const std::string& dir) {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const std::string& name : checkpoint_->TensorNames()) {
      auto tensor = checkpoint_->LoadTensor(name, at::kFloat, at::kCPU);
      EXPECT_TRUE(tensor.ok()) << tensor.status();
      bool projection = false;
      for (const char* target : kProjections) {
        if (name.find(std::string(target) + ".weight") != std::string::npos) {
          projection = true;
        }
      }
      tensors.emplace_back(name, projection ? Dequantized(*tensor) : *tensor);
    }
    EXPECT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
    std::ofstream(dir + "/config.json")
        << testing::ReadFile(Stories260kDir() + "/config.json");
    auto copy = Checkpoint::Open(dir);
    EXPECT_TRUE(copy.ok()) << copy.status();
    return copy.ok() ? *copy : nullptr;
  }

  std::shared_ptr<const Checkpoint> checkpoint_;
};

TEST_F(QuantizedSpanTest, Int8OutputCloseToFloat32) {
  at::manual_seed(22);
  const auto int8 = LoadSpan(0, 5, at::kFloat, Quantization::kInt8);
  const auto float32 = LoadSpan(0, 5, at::kFloat, Quantization::kNone);
  ASSERT_NE(int8, nullptr);
  ASSERT_NE(float32, nullptr);
  EXPECT_EQ(int8->quantization(), Quantization::kInt8);

  const at::Tensor hidden = at::randn({1, 12, 64});
  auto int8_cache = int8->AllocateCache(0, 5, 1, 12);
  auto float_cache = float32->AllocateCache(0, 5, 1, 12);
  auto output = int8->Forward(hidden, int8_cache, 0, 0, 5);
  auto expected = float32->Forward(hidden, float_cache, 0, 0, 5);
  ASSERT_TRUE(output.ok()) << output.status();
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_LT(RelativeDiff(*output, *expected), 0.05);
}

TEST_F(QuantizedSpanTest, ParameterBytesRatios) {
  const auto float32 = LoadSpan(0, 5, at::kFloat, Quantization::kNone);
  const auto bf16 = LoadSpan(0, 5, at::kBFloat16, Quantization::kNone);
  const auto int8 = LoadSpan(0, 5, at::kFloat, Quantization::kInt8);
  const auto int8_bf16 = LoadSpan(0, 5, at::kBFloat16, Quantization::kInt8);
  ASSERT_NE(float32, nullptr);
  ASSERT_NE(bf16, nullptr);
  ASSERT_NE(int8, nullptr);
  ASSERT_NE(int8_bf16, nullptr);

  const double base = static_cast<double>(float32->ParameterBytes());
  EXPECT_DOUBLE_EQ(bf16->ParameterBytes() / base, 0.5);
  // int8 values plus a float32 scale per row of 64 or 172 columns.
  const double int8_ratio = int8->ParameterBytes() / base;
  EXPECT_GT(int8_ratio, 0.25);
  EXPECT_LT(int8_ratio, 0.28);
  EXPECT_LT(int8_bf16->ParameterBytes(), int8->ParameterBytes());

  // The span choice counts the same bytes before loading.
  const ModelConfig& config = checkpoint_->config();
  EXPECT_EQ(int8->ParameterBytes(),
            5 * BlockWeightBytes(config, at::kFloat, Quantization::kInt8));
  EXPECT_EQ(int8_bf16->ParameterBytes(),
            5 * BlockWeightBytes(config, at::kBFloat16, Quantization::kInt8));
  EXPECT_EQ(bf16->ParameterBytes(), 5 * BlockWeightBytes(config, at::kBFloat16));
}

TEST_F(QuantizedSpanTest, Bfloat16KvCacheIsBfloat16) {
  const auto float32 = LoadSpan(0, 2, at::kFloat, Quantization::kNone);
  ASSERT_NE(float32, nullptr);
  for (const Quantization quantization :
       {Quantization::kNone, Quantization::kInt8}) {
    const auto bf16 = LoadSpan(0, 2, at::kBFloat16, quantization);
    ASSERT_NE(bf16, nullptr);
    const auto cache = bf16->AllocateCache(0, 2, 1, 16);
    ASSERT_EQ(cache.size(), 2u);
    EXPECT_EQ(cache[0].keys.scalar_type(), at::kBFloat16);
    EXPECT_EQ(cache[1].values.scalar_type(), at::kBFloat16);
    EXPECT_EQ(bf16->CacheBytesPerTokenPerBlock() * 2,
              float32->CacheBytesPerTokenPerBlock());
  }
}

// Inference with LoRA and the backward pass of training through int8
// blocks equal those through float32 blocks holding the dequantised
// weights.
TEST_F(QuantizedSpanTest, LoraAndBackwardMatchDequantizedCheckpoint) {
  at::manual_seed(23);
  TempDir dir;
  const auto dequantized_checkpoint = WriteDequantizedCopy(dir.path());
  ASSERT_NE(dequantized_checkpoint, nullptr);
  auto reference = BlockSpan::Load(*dequantized_checkpoint, 1, 4, at::kFloat,
                                   at::kCPU);
  ASSERT_TRUE(reference.ok()) << reference.status();
  const auto int8 = LoadSpan(1, 4, at::kFloat, Quantization::kInt8);
  ASSERT_NE(int8, nullptr);

  const ModelConfig& config = checkpoint_->config();
  std::map<int, BlockAdapter> adapters;
  adapters[1] = RandomLora(config, 4);
  adapters[3] = RandomLora(config, 2);
  adapters[3].prompt = at::randn({1, 2, config.hidden_size}) * 0.5;
  const at::Tensor inputs = at::randn({2, 6, config.hidden_size});
  const at::Tensor grad_outputs = at::randn({2, 6, config.hidden_size});

  // Inference with a KV cache, LoRA only.
  std::map<int, BlockAdapter> lora_only = adapters;
  lora_only[3].prompt = at::Tensor();
  auto int8_cache = int8->AllocateCache(1, 4, 2, 6);
  auto reference_cache = (*reference)->AllocateCache(1, 4, 2, 6);
  auto output = int8->Forward(inputs, int8_cache, 0, 1, 4, &lora_only);
  auto expected =
      (*reference)->Forward(inputs, reference_cache, 0, 1, 4, &lora_only);
  ASSERT_TRUE(output.ok()) << output.status();
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_LT(MaxAbsDiff(*output, *expected), 1e-4);

  // Backward: input and adapter gradients.
  auto result = RunBackward(*int8, 1, 4, inputs, adapters, grad_outputs);
  auto expected_result =
      RunBackward(**reference, 1, 4, inputs, adapters, grad_outputs);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(expected_result.ok()) << expected_result.status();
  EXPECT_LT(RelativeDiff(result->grad_inputs, expected_result->grad_inputs),
            1e-4);
  for (const auto& [block, expected_grad] : expected_result->grad_adapters) {
    const BlockAdapter& grad = result->grad_adapters.at(block);
    for (const auto& [target, expected_lora] : expected_grad.lora) {
      EXPECT_LT(RelativeDiff(grad.lora.at(target).a, expected_lora.a), 1e-4)
          << "block " << block << " " << target << " a";
      EXPECT_LT(RelativeDiff(grad.lora.at(target).b, expected_lora.b), 1e-4)
          << "block " << block << " " << target << " b";
    }
    if (expected_grad.prompt.defined()) {
      EXPECT_LT(RelativeDiff(grad.prompt, expected_grad.prompt), 1e-4)
          << "block " << block << " prompt";
    }
  }
}

}  // namespace
}  // namespace pollen::node
