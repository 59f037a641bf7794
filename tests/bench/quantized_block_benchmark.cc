// Decode steps and prefill of one TinyLlama-1.1B-shape LlamaBlock with
// random weights, in each block precision a node can serve: float32,
// bfloat16, and int8 weights computing in either.
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "common/model_config.h"
#include "node/llama_block.h"
#include "node/quantized_linear.h"

namespace pollen::node {
namespace {

// Cache positions before the timed tokens.
constexpr int64_t kContext = 128;
// Tokens of the timed prefill step.
constexpr int64_t kPrefillTokens = 128;

struct Precision {
  at::ScalarType dtype;
  Quantization quantization;
};

ModelConfig TinyLlamaBlockConfig() {
  ModelConfig config;
  config.model_type = "llama";
  config.hidden_size = 2048;
  config.intermediate_size = 5632;
  config.num_hidden_layers = 1;
  config.num_attention_heads = 32;
  config.num_key_value_heads = 4;
  config.head_dim = 64;
  config.vocab_size = 32000;
  config.max_position_embeddings = 2048;
  config.rms_norm_eps = 1e-5;
  return config;
}

// Norms 1 in `dtype`; projections ~ N(0, 0.02^2) in float32, which the block
// converts or quantises.
LlamaBlockWeights RandomWeights(const ModelConfig& config,
                                at::ScalarType dtype) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  const int64_t intermediate = config.intermediate_size;
  auto linear = [](int64_t out, int64_t in) {
    return at::randn({out, in}) * 0.02;
  };
  LlamaBlockWeights weights;
  weights.input_layernorm = at::ones({hidden}, dtype);
  weights.q_proj = linear(q_out, hidden);
  weights.k_proj = linear(kv_out, hidden);
  weights.v_proj = linear(kv_out, hidden);
  weights.o_proj = linear(hidden, q_out);
  weights.post_attention_layernorm = at::ones({hidden}, dtype);
  weights.gate_proj = linear(intermediate, hidden);
  weights.up_proj = linear(intermediate, hidden);
  weights.down_proj = linear(hidden, intermediate);
  return weights;
}

// Runs steps of `tokens` new tokens at position kContext of a cache that
// contains kContext earlier positions.
// POLLEN_BENCH_THREADS sets libtorch's intra-op threads (default: its own
// choice).
void RunBlock(benchmark::State& state, Precision precision, int64_t tokens) {
  if (const char* threads = std::getenv("POLLEN_BENCH_THREADS")) {
    at::set_num_threads(std::max(1, std::atoi(threads)));
  }
  at::NoGradGuard no_grad;
  const ModelConfig config = TinyLlamaBlockConfig();
  const at::ScalarType dtype = precision.dtype;
  auto rotary = std::make_shared<const RotaryEmbedding>(
      config, kContext + tokens, dtype, at::kCPU);
  const LlamaBlock block(0, config, RandomWeights(config, dtype), rotary,
                         precision.quantization);

  // [1, kv_heads, kContext + tokens, head_dim].
  LayerKvCache cache;
  cache.keys = at::randn({1, config.num_key_value_heads, kContext + tokens,
                          config.head_dim})
                   .to(dtype);
  cache.values = at::randn_like(cache.keys);
  const at::Tensor hidden = at::randn({1, tokens, config.hidden_size}).to(dtype);

  for (auto _ : state) {
    benchmark::DoNotOptimize(block.Forward(hidden, cache, kContext));
  }
  state.counters["weight_MiB"] =
      static_cast<double>(block.ParameterBytes()) / (1 << 20);
  state.counters["tok/s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * tokens),
      benchmark::Counter::kIsRate);
}

void BM_TinyLlamaBlockDecode(benchmark::State& state, Precision precision) {
  RunBlock(state, precision, 1);
}

void BM_TinyLlamaBlockPrefill(benchmark::State& state, Precision precision) {
  RunBlock(state, precision, kPrefillTokens);
}

constexpr Precision kFloat32{at::kFloat, Quantization::kNone};
constexpr Precision kBfloat16{at::kBFloat16, Quantization::kNone};
constexpr Precision kFloat32Int8{at::kFloat, Quantization::kInt8};
constexpr Precision kBfloat16Int8{at::kBFloat16, Quantization::kInt8};

BENCHMARK_CAPTURE(BM_TinyLlamaBlockDecode, float32, kFloat32)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_TinyLlamaBlockDecode, bfloat16, kBfloat16)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_TinyLlamaBlockDecode, float32_int8, kFloat32Int8)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_TinyLlamaBlockDecode, bfloat16_int8, kBfloat16Int8)
    ->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_CAPTURE(BM_TinyLlamaBlockPrefill, float32, kFloat32)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_TinyLlamaBlockPrefill, bfloat16, kBfloat16)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_TinyLlamaBlockPrefill, float32_int8, kFloat32Int8)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_TinyLlamaBlockPrefill, bfloat16_int8, kBfloat16Int8)
    ->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace pollen::node
