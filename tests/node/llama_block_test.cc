#include "node/llama_block.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "common/checkpoint.h"
#include "tests/support/test_support.h"

namespace pollen::node {
namespace {

constexpr double kTolerance = 1e-5;

// A small grouped-query config with three query heads per kv head.
ModelConfig RandomConfig() {
  ModelConfig config;
  config.model_type = "llama";
  config.hidden_size = 48;
  config.intermediate_size = 80;
  config.num_hidden_layers = 1;
  config.num_attention_heads = 6;
  config.num_key_value_heads = 2;
  config.head_dim = 8;
  config.vocab_size = 16;
  config.max_position_embeddings = 64;
  config.rope_theta = 500000;
  config.rms_norm_eps = 1e-5;
  return config;
}

LlamaBlockWeights RandomWeights(const ModelConfig& config) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  const int64_t intermediate = config.intermediate_size;
  auto matrix = [](int64_t rows, int64_t columns) {
    return at::randn({rows, columns}) * 0.2;
  };
  LlamaBlockWeights weights;
  weights.input_layernorm = 1 + 0.1 * at::randn({hidden});
  weights.q_proj = matrix(q_out, hidden);
  weights.k_proj = matrix(kv_out, hidden);
  weights.v_proj = matrix(kv_out, hidden);
  weights.o_proj = matrix(hidden, q_out);
  weights.post_attention_layernorm = 1 + 0.1 * at::randn({hidden});
  weights.gate_proj = matrix(intermediate, hidden);
  weights.up_proj = matrix(intermediate, hidden);
  weights.down_proj = matrix(hidden, intermediate);
  return weights;
}

LlamaBlockWeights StoriesWeights(const Checkpoint& checkpoint, int block) {
  auto load = [&](const std::string& name) {
    auto tensor = checkpoint.LoadTensor(
        absl::StrCat("model.layers.", block, ".", name), at::kFloat, at::kCPU);
    EXPECT_TRUE(tensor.ok()) << tensor.status();
    return tensor.ok() ? *tensor : at::Tensor();
  };
  LlamaBlockWeights weights;
  weights.input_layernorm = load("input_layernorm.weight");
  weights.q_proj = load("self_attn.q_proj.weight");
  weights.k_proj = load("self_attn.k_proj.weight");
  weights.v_proj = load("self_attn.v_proj.weight");
  weights.o_proj = load("self_attn.o_proj.weight");
  weights.post_attention_layernorm = load("post_attention_layernorm.weight");
  weights.gate_proj = load("mlp.gate_proj.weight");
  weights.up_proj = load("mlp.up_proj.weight");
  weights.down_proj = load("mlp.down_proj.weight");
  return weights;
}

// --- Reference: the Hugging Face LlamaDecoderLayer written out in float64
// with explicit loops, for a whole sequence starting at position 0. ---

// x [batch, seq, hidden] -> x / sqrt(mean(x^2) + eps) * weight, row by row.
at::Tensor ReferenceRmsNorm(const at::Tensor& x, const at::Tensor& weight,
                            double eps) {
  at::Tensor out = at::empty_like(x);
  const auto in = x.accessor<double, 3>();
  const auto w = weight.accessor<double, 1>();
  auto result = out.accessor<double, 3>();
  for (int64_t b = 0; b < x.size(0); ++b) {
    for (int64_t t = 0; t < x.size(1); ++t) {
      double sum_squares = 0;
      for (int64_t i = 0; i < x.size(2); ++i) {
        sum_squares += in[b][t][i] * in[b][t][i];
      }
      const double scale = 1.0 / std::sqrt(sum_squares / x.size(2) + eps);
      for (int64_t i = 0; i < x.size(2); ++i) {
        result[b][t][i] = in[b][t][i] * scale * w[i];
      }
    }
  }
  return out;
}

// x [batch, seq, heads, d]: rotates each pair (j, j + d/2) of the token at
// position t by angle t * theta^(-2j/d).
at::Tensor ReferenceRotary(const at::Tensor& x, double theta) {
  at::Tensor out = at::empty_like(x);
  const auto in = x.accessor<double, 4>();
  auto result = out.accessor<double, 4>();
  const int64_t d = x.size(3);
  for (int64_t b = 0; b < x.size(0); ++b) {
    for (int64_t t = 0; t < x.size(1); ++t) {
      for (int64_t h = 0; h < x.size(2); ++h) {
        for (int64_t j = 0; j < d / 2; ++j) {
          const double angle =
              static_cast<double>(t) * std::pow(theta, -2.0 * j / d);
          const double x1 = in[b][t][h][j];
          const double x2 = in[b][t][h][j + d / 2];
          result[b][t][h][j] = x1 * std::cos(angle) - x2 * std::sin(angle);
          result[b][t][h][j + d / 2] =
              x2 * std::cos(angle) + x1 * std::sin(angle);
        }
      }
    }
  }
  return out;
}

// q [batch, seq, heads, d], k and v [batch, seq, kv_heads, d] -> causal
// softmax attention [batch, seq, heads, d]; query head h reads kv head
// h / (heads / kv_heads).
at::Tensor ReferenceAttention(const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v) {
  const int64_t batch = q.size(0);
  const int64_t seq = q.size(1);
  const int64_t heads = q.size(2);
  const int64_t d = q.size(3);
  const int64_t group = heads / k.size(2);
  at::Tensor out = at::zeros_like(q);
  const auto qa = q.accessor<double, 4>();
  const auto ka = k.accessor<double, 4>();
  const auto va = v.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kv = h / group;
      for (int64_t t = 0; t < seq; ++t) {
        std::vector<double> scores(t + 1);
        double max_score = -INFINITY;
        for (int64_t s = 0; s <= t; ++s) {
          double dot = 0;
          for (int64_t i = 0; i < d; ++i) dot += qa[b][t][h][i] * ka[b][s][kv][i];
          scores[s] = dot / std::sqrt(static_cast<double>(d));
          max_score = std::max(max_score, scores[s]);
        }
        double total = 0;
        for (double& score : scores) {
          score = std::exp(score - max_score);
          total += score;
        }
        for (int64_t s = 0; s <= t; ++s) {
          for (int64_t i = 0; i < d; ++i) {
            oa[b][t][h][i] += scores[s] / total * va[b][s][kv][i];
          }
        }
      }
    }
  }
  return out;
}

at::Tensor ReferenceBlock(const ModelConfig& config,
                          const LlamaBlockWeights& weights,
                          const at::Tensor& hidden) {
  auto w = [](const at::Tensor& t) { return t.to(at::kDouble); };
  const at::Tensor x = hidden.to(at::kDouble);
  const int64_t batch = x.size(0);
  const int64_t seq = x.size(1);
  const int64_t d = config.head_dim;

  const at::Tensor normed =
      ReferenceRmsNorm(x, w(weights.input_layernorm), config.rms_norm_eps);
  const at::Tensor q =
      at::matmul(normed, w(weights.q_proj).t())
          .reshape({batch, seq, config.num_attention_heads, d});
  const at::Tensor k =
      at::matmul(normed, w(weights.k_proj).t())
          .reshape({batch, seq, config.num_key_value_heads, d});
  const at::Tensor v =
      at::matmul(normed, w(weights.v_proj).t())
          .reshape({batch, seq, config.num_key_value_heads, d});
  const at::Tensor attention =
      ReferenceAttention(ReferenceRotary(q, config.rope_theta),
                         ReferenceRotary(k, config.rope_theta), v)
          .reshape({batch, seq, config.num_attention_heads * d});
  const at::Tensor h = x + at::matmul(attention, w(weights.o_proj).t());

  const at::Tensor normed2 = ReferenceRmsNorm(
      h, w(weights.post_attention_layernorm), config.rms_norm_eps);
  const at::Tensor gate = at::matmul(normed2, w(weights.gate_proj).t());
  const at::Tensor up = at::matmul(normed2, w(weights.up_proj).t());
  const at::Tensor silu = gate / (1 + at::exp(-gate));
  return h + at::matmul(silu * up, w(weights.down_proj).t());
}

LayerKvCache ZeroCache(const ModelConfig& config, int64_t batch,
                       int64_t max_length) {
  const std::vector<int64_t> shape = {batch, config.num_key_value_heads,
                                      max_length, config.head_dim};
  return LayerKvCache{at::zeros(shape), at::zeros(shape)};
}

double MaxDifference(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Runs `block` on a random sequence of `batch` x `seq` and compares it with
// the reference.
void ExpectMatchesReference(const ModelConfig& config,
                            const LlamaBlockWeights& weights, int64_t batch,
                            int64_t seq) {
  auto rotary = std::make_shared<const RotaryEmbedding>(
      config, config.max_position_embeddings, at::kFloat, at::kCPU);
  const LlamaBlock block(0, config, weights, rotary);
  const at::Tensor hidden = at::randn({batch, seq, config.hidden_size});
  LayerKvCache cache = ZeroCache(config, batch, seq + 3);

  const at::Tensor output = block.Forward(hidden, cache, 0);
  const at::Tensor expected = ReferenceBlock(config, weights, hidden);
  ASSERT_EQ(output.sizes(), hidden.sizes());
  EXPECT_EQ(output.scalar_type(), at::kFloat);
  EXPECT_LT(MaxDifference(output, expected), kTolerance)
      << "batch " << batch << ", seq " << seq;
}

// Runs the same sequence as one prefill and as a prefill of `prefill` tokens
// followed by one-token decode steps, and compares outputs and caches.
void ExpectDecodeMatchesPrefill(const ModelConfig& config,
                                const LlamaBlockWeights& weights,
                                int64_t batch, int64_t seq, int64_t prefill) {
  auto rotary = std::make_shared<const RotaryEmbedding>(
      config, config.max_position_embeddings, at::kFloat, at::kCPU);
  const LlamaBlock block(0, config, weights, rotary);
  const at::Tensor hidden = at::randn({batch, seq, config.hidden_size});

  LayerKvCache whole_cache = ZeroCache(config, batch, seq);
  const at::Tensor whole = block.Forward(hidden, whole_cache, 0);

  LayerKvCache step_cache = ZeroCache(config, batch, seq);
  std::vector<at::Tensor> pieces = {
      block.Forward(hidden.narrow(1, 0, prefill), step_cache, 0)};
  for (int64_t position = prefill; position < seq; ++position) {
    pieces.push_back(
        block.Forward(hidden.narrow(1, position, 1), step_cache, position));
  }
  const at::Tensor stepped = at::cat(pieces, 1);

  EXPECT_LT(MaxDifference(stepped, whole), kTolerance);
  EXPECT_LT(MaxDifference(step_cache.keys, whole_cache.keys), kTolerance);
  EXPECT_LT(MaxDifference(step_cache.values, whole_cache.values), kTolerance);
}

TEST(LlamaBlock, StoriesMatchesReference) {
  auto checkpoint = Checkpoint::Open(pollen::testing::Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  at::manual_seed(1);
  for (int block : {0, 4}) {
    const LlamaBlockWeights weights = StoriesWeights(**checkpoint, block);
    ExpectMatchesReference((*checkpoint)->config(), weights, 1, 9);
    ExpectMatchesReference((*checkpoint)->config(), weights, 2, 9);
  }
}

TEST(LlamaBlock, GroupedQueryMatchesReference) {
  const ModelConfig config = RandomConfig();
  at::manual_seed(2);
  const LlamaBlockWeights weights = RandomWeights(config);
  ExpectMatchesReference(config, weights, 1, 11);
  ExpectMatchesReference(config, weights, 2, 11);
}

TEST(LlamaBlock, MultiHeadMatchesReference) {
  ModelConfig config = RandomConfig();
  config.num_key_value_heads = config.num_attention_heads;
  at::manual_seed(3);
  const LlamaBlockWeights weights = RandomWeights(config);
  ExpectMatchesReference(config, weights, 2, 6);
}

TEST(LlamaBlock, StoriesDecodeMatchesPrefill) {
  auto checkpoint = Checkpoint::Open(pollen::testing::Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  at::manual_seed(4);
  const LlamaBlockWeights weights = StoriesWeights(**checkpoint, 2);
  ExpectDecodeMatchesPrefill((*checkpoint)->config(), weights, 1, 12, 5);
  ExpectDecodeMatchesPrefill((*checkpoint)->config(), weights, 2, 12, 5);
}

TEST(LlamaBlock, GroupedQueryDecodeMatchesPrefill) {
  const ModelConfig config = RandomConfig();
  at::manual_seed(5);
  const LlamaBlockWeights weights = RandomWeights(config);
  ExpectDecodeMatchesPrefill(config, weights, 2, 10, 3);
  ExpectDecodeMatchesPrefill(config, weights, 1, 10, 1);
}

TEST(LlamaBlock, ChunkedPrefillMatches) {
  const ModelConfig config = RandomConfig();
  at::manual_seed(6);
  auto rotary = std::make_shared<const RotaryEmbedding>(config, 64, at::kFloat,
                                                        at::kCPU);
  const LlamaBlock block(0, config, RandomWeights(config), rotary);
  const at::Tensor hidden = at::randn({2, 9, config.hidden_size});
  LayerKvCache whole_cache = ZeroCache(config, 2, 16);
  const at::Tensor whole = block.Forward(hidden, whole_cache, 0);

  LayerKvCache chunk_cache = ZeroCache(config, 2, 16);
  const at::Tensor first = block.Forward(hidden.narrow(1, 0, 4), chunk_cache, 0);
  const at::Tensor second =
      block.Forward(hidden.narrow(1, 4, 5), chunk_cache, 4);
  EXPECT_LT(MaxDifference(at::cat({first, second}, 1), whole), kTolerance);
}

TEST(LlamaBlock, LoadFromCheckpoint) {
  auto checkpoint = Checkpoint::Open(pollen::testing::Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  auto rotary = std::make_shared<const RotaryEmbedding>(config, 32, at::kFloat,
                                                        at::kCPU);
  auto loaded = LlamaBlock::Load(**checkpoint, 3, at::kFloat, at::kCPU, rotary);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->block_index(), 3);
  // 2 norms of 64, q and o 64 x 64, k and v 32 x 64, 3 MLP 172 x 64; float32.
  EXPECT_EQ(loaded->ParameterBytes(),
            4 * (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64));

  at::manual_seed(7);
  const at::Tensor hidden = at::randn({1, 4, 64});
  LayerKvCache cache = ZeroCache(config, 1, 8);
  const at::Tensor expected =
      ReferenceBlock(config, StoriesWeights(**checkpoint, 3), hidden);
  EXPECT_LT(MaxDifference(loaded->Forward(hidden, cache, 0), expected),
            kTolerance);
}

TEST(LlamaBlock, LoadMissingBlock) {
  auto checkpoint = Checkpoint::Open(pollen::testing::Stories260kDir());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto rotary = std::make_shared<const RotaryEmbedding>(
      (*checkpoint)->config(), 32, at::kFloat, at::kCPU);
  const absl::Status status =
      LlamaBlock::Load(**checkpoint, 7, at::kFloat, at::kCPU, rotary).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("model.layers.7."), absl::string_view::npos)
      << status;
}

TEST(LlamaBlock, ForwardRejectsBadInput) {
  const ModelConfig config = RandomConfig();
  auto rotary = std::make_shared<const RotaryEmbedding>(config, 8, at::kFloat,
                                                        at::kCPU);
  const LlamaBlock block(0, config, RandomWeights(config), rotary);
  LayerKvCache cache = ZeroCache(config, 1, 8);

  // Past the end of the cache.
  EXPECT_THROW(block.Forward(at::randn({1, 2, 48}), cache, 7), c10::Error);
  // Wrong hidden size.
  EXPECT_THROW(block.Forward(at::randn({1, 2, 40}), cache, 0), c10::Error);
  // Cache batch differs from the input batch.
  EXPECT_THROW(block.Forward(at::randn({2, 2, 48}), cache, 0), c10::Error);
  // Wrong dtype.
  EXPECT_THROW(block.Forward(at::randn({1, 2, 48}, at::kDouble), cache, 0),
               c10::Error);
  // Past the end of the rotary table.
  LayerKvCache long_cache = ZeroCache(config, 1, 16);
  EXPECT_THROW(block.Forward(at::randn({1, 2, 48}), long_cache, 8),
               c10::Error);
}

TEST(LlamaBlock, ConstructorRejectsBadShape) {
  const ModelConfig config = RandomConfig();
  auto rotary = std::make_shared<const RotaryEmbedding>(config, 8, at::kFloat,
                                                        at::kCPU);
  LlamaBlockWeights weights = RandomWeights(config);
  weights.k_proj = at::randn({48, 48});
  EXPECT_THROW(LlamaBlock(0, config, weights, rotary), c10::Error);
}

TEST(RotaryEmbedding, TableValues) {
  ModelConfig config = RandomConfig();
  config.rope_theta = 10000;
  const RotaryEmbedding rotary(config, 5, at::kFloat, at::kCPU);
  ASSERT_EQ(rotary.cos().sizes(), (at::IntArrayRef{5, 8}));
  EXPECT_EQ(rotary.max_positions(), 5);
  // Column 1 (and its twin 5) rotates by theta^(-2/8) = 0.1 per position.
  EXPECT_NEAR(rotary.cos()[3][1].item<double>(), std::cos(0.3), 1e-7);
  EXPECT_NEAR(rotary.sin()[3][5].item<double>(), std::sin(0.3), 1e-7);
  EXPECT_NEAR(rotary.cos()[4][0].item<double>(), std::cos(4.0), 1e-7);
}

}  // namespace
}  // namespace pollen::node
