// One LlamaBlock decode step (one new token, batch 1) with random float32
// weights, at stories260k's and TinyLlama-1.1B's block sizes.
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "common/model_config.h"
#include "node/llama_block.h"

namespace pollen::node {
namespace {

// Cache positions before the timed token; each step attends over them.
constexpr int64_t kContext = 128;

ModelConfig BlockConfig(int64_t hidden, int64_t intermediate, int64_t heads,
                        int64_t kv_heads) {
  ModelConfig config;
  config.model_type = "llama";
  config.hidden_size = hidden;
  config.intermediate_size = intermediate;
  config.num_hidden_layers = 1;
  config.num_attention_heads = heads;
  config.num_key_value_heads = kv_heads;
  config.head_dim = hidden / heads;
  config.vocab_size = 32000;
  config.max_position_embeddings = 2048;
  config.rms_norm_eps = 1e-5;
  return config;
}

// Weights ~ N(0, 0.02^2), norms 1, in the shapes of `config`.
LlamaBlockWeights RandomWeights(const ModelConfig& config) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  const int64_t intermediate = config.intermediate_size;
  auto linear = [](int64_t out, int64_t in) { return at::randn({out, in}) * 0.02; };
  LlamaBlockWeights weights;
  weights.input_layernorm = at::ones({hidden});
  weights.q_proj = linear(q_out, hidden);
  weights.k_proj = linear(kv_out, hidden);
  weights.v_proj = linear(kv_out, hidden);
  weights.o_proj = linear(hidden, q_out);
  weights.post_attention_layernorm = at::ones({hidden});
  weights.gate_proj = linear(intermediate, hidden);
  weights.up_proj = linear(intermediate, hidden);
  weights.down_proj = linear(hidden, intermediate);
  return weights;
}

void BM_LlamaBlockDecode(benchmark::State& state, const ModelConfig& config) {
  at::NoGradGuard no_grad;
  auto rotary = std::make_shared<const RotaryEmbedding>(
      config, kContext + 1, at::kFloat, at::kCPU);
  const LlamaBlock block(0, config, RandomWeights(config), rotary);

  // [1, kv_heads, kContext + 1, head_dim] with kContext earlier positions.
  LayerKvCache cache;
  cache.keys = at::randn({1, config.num_key_value_heads, kContext + 1, config.head_dim});
  cache.values = at::randn_like(cache.keys);
  const at::Tensor hidden = at::randn({1, 1, config.hidden_size});

  for (auto _ : state) {
    benchmark::DoNotOptimize(block.Forward(hidden, cache, kContext));
  }
  state.SetBytesProcessed(state.iterations() * block.ParameterBytes());
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_LlamaBlockDecode, stories260k, BlockConfig(64, 172, 8, 4));

// One batched decode pass (LlamaBlock::ForwardBatch) over state.range(0)
// sessions of one new token each, every session with its own cache of
// kContext earlier positions, as a node runs the steps of concurrent
// sessions that arrive together.
void BM_LlamaBlockBatchedDecode(benchmark::State& state,
                                const ModelConfig& config) {
  at::NoGradGuard no_grad;
  const int64_t sessions = state.range(0);
  auto rotary = std::make_shared<const RotaryEmbedding>(
      config, kContext + 1, at::kFloat, at::kCPU);
  const LlamaBlock block(0, config, RandomWeights(config), rotary);

  std::vector<LayerKvCache> caches(sessions);
  std::vector<SequenceSlice> slices;
  for (LayerKvCache& cache : caches) {
    cache.keys = at::randn(
        {1, config.num_key_value_heads, kContext + 1, config.head_dim});
    cache.values = at::randn_like(cache.keys);
    slices.push_back(SequenceSlice{&cache, kContext, 1, 1});
  }
  const at::Tensor hidden = at::randn({sessions, config.hidden_size});

  for (auto _ : state) {
    benchmark::DoNotOptimize(block.ForwardBatch(hidden, slices));
  }
  state.counters["rows/s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * sessions),
      benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_LlamaBlockBatchedDecode, stories260k,
                  BlockConfig(64, 172, 8, 4))
    ->Arg(1)
    ->Arg(8)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_LlamaBlockDecode, tinyllama_1_1b,
                  BlockConfig(2048, 5632, 32, 4))
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace pollen::node
