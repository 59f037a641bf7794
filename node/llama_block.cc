#include "node/llama_block.h"

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"

#include "common/status_util.h"
#include "node/cpu_block_forward.h"

namespace pollen::node {
namespace {

// rotate_half(x) = cat(-x2, x1), where x1 and x2 are the halves of the last
// dimension.
at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

void CheckShape(const at::Tensor& tensor, const char* name,
                at::IntArrayRef expected) {
  TORCH_CHECK(tensor.defined(), "weight ", name, " is undefined");
  TORCH_CHECK(tensor.sizes() == expected, "weight ", name, " has shape ",
              tensor.sizes(), ", expected ", expected);
}

// scaling * B (A x) for the LoRA adapter of `target`, or an undefined
// tensor when `adapter` has none. x is [batch, tokens, in].
at::Tensor LoraDelta(const at::Tensor& x, const BlockAdapter* adapter,
                     const char* target) {
  if (adapter == nullptr) return at::Tensor();
  const auto it = adapter->lora.find(target);
  if (it == adapter->lora.end()) return at::Tensor();
  const LoraAdapter& lora = it->second;
  const at::Tensor a = lora.a.to(x.device(), x.scalar_type());  // [rank, in]
  const at::Tensor b = lora.b.to(x.device(), x.scalar_type());  // [out, rank]
  return at::linear(at::linear(x, a), b) * lora.scaling;
}

// base + delta, or base when delta is undefined.
at::Tensor AddDelta(const at::Tensor& base, const at::Tensor& delta) {
  return delta.defined() ? base + delta : base;
}

}  // namespace

RotaryEmbedding::RotaryEmbedding(const ModelConfig& config,
                                 int64_t max_positions, at::ScalarType dtype,
                                 at::Device device)
    : max_positions_(max_positions) {
  const int64_t head_dim = config.head_dim;
  const auto options = at::TensorOptions().dtype(at::kDouble);

  // inv_freq[i] = 1 / theta^(2i / head_dim), i < head_dim / 2.
  const at::Tensor exponents =
      at::arange(0, head_dim, 2, options) / static_cast<double>(head_dim);
  const at::Tensor inv_freq = at::pow(config.rope_theta, exponents).reciprocal();

  // angles[p, j] = p * inv_freq[j mod head_dim/2].
  const at::Tensor positions = at::arange(max_positions, options);
  const at::Tensor freqs = at::outer(positions, inv_freq);
  const at::Tensor angles = at::cat({freqs, freqs}, -1);

  cos_ = angles.cos().to(device, dtype);
  sin_ = angles.sin().to(device, dtype);
}

LlamaBlock::LlamaBlock(int block_index, const ModelConfig& config,
                       LlamaBlockWeights weights,
                       std::shared_ptr<const RotaryEmbedding> rotary,
                       Quantization quantization)
    : block_index_(block_index),
      hidden_size_(config.hidden_size),
      num_heads_(config.num_attention_heads),
      num_kv_heads_(config.num_key_value_heads),
      head_dim_(config.head_dim),
      rms_norm_eps_(config.rms_norm_eps),
      rotary_(std::move(rotary)) {
  const int64_t hidden = hidden_size_;
  const int64_t q_out = num_heads_ * head_dim_;
  const int64_t kv_out = num_kv_heads_ * head_dim_;
  const int64_t intermediate = config.intermediate_size;
  CheckShape(weights.input_layernorm, "input_layernorm", {hidden});
  CheckShape(weights.q_proj, "q_proj", {q_out, hidden});
  CheckShape(weights.k_proj, "k_proj", {kv_out, hidden});
  CheckShape(weights.v_proj, "v_proj", {kv_out, hidden});
  CheckShape(weights.o_proj, "o_proj", {hidden, q_out});
  CheckShape(weights.post_attention_layernorm, "post_attention_layernorm",
             {hidden});
  CheckShape(weights.gate_proj, "gate_proj", {intermediate, hidden});
  CheckShape(weights.up_proj, "up_proj", {intermediate, hidden});
  CheckShape(weights.down_proj, "down_proj", {hidden, intermediate});
  TORCH_CHECK(rotary_ != nullptr, "block ", block_index, " has no rotary table");
  TORCH_CHECK(rotary_->cos().size(1) == head_dim_, "rotary table has ",
              rotary_->cos().size(1), " columns, expected head_dim ",
              head_dim_);

  // Per-row quantisation of a stacked matrix equals that of its parts, so
  // the stacks are quantised whole.
  const at::ScalarType dtype = weights.input_layernorm.scalar_type();
  input_layernorm_ = std::move(weights.input_layernorm);
  qkv_proj_ = QuantizedLinear(
      at::cat({weights.q_proj, weights.k_proj, weights.v_proj}, 0),
      quantization, dtype);
  o_proj_ = QuantizedLinear(weights.o_proj, quantization, dtype);
  post_attention_layernorm_ = std::move(weights.post_attention_layernorm);
  gate_up_proj_ = QuantizedLinear(
      at::cat({weights.gate_proj, weights.up_proj}, 0), quantization, dtype);
  down_proj_ = QuantizedLinear(weights.down_proj, quantization, dtype);

  if (quantization == Quantization::kNone && dtype == at::kFloat &&
      qkv_proj_.device().is_cpu() &&
      ParameterBytes() <= kTransposedCopyMaxBytes) {
    transposed_ = std::make_shared<const TransposedProjections>(
        TransposeProjections(qkv_proj_.DequantizedWeight(),
                             o_proj_.DequantizedWeight(),
                             gate_up_proj_.DequantizedWeight(),
                             down_proj_.DequantizedWeight()));
  }
}

absl::StatusOr<LlamaBlock> LlamaBlock::Load(
    const Checkpoint& checkpoint, int block_index, at::ScalarType dtype,
    at::Device device, std::shared_ptr<const RotaryEmbedding> rotary,
    Quantization quantization) {
  const ModelConfig& config = checkpoint.config();
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  const int64_t intermediate = config.intermediate_size;
  const std::string prefix = absl::StrCat("model.layers.", block_index, ".");

  auto load = [&](const std::string& name,
                  std::vector<int64_t> shape) -> absl::StatusOr<at::Tensor> {
    return checkpoint.LoadTensor(prefix + name, dtype, device, shape);
  };
  const at::ScalarType projection_dtype =
      quantization == Quantization::kNone ? dtype : at::kFloat;
  auto load_projection =
      [&](const std::string& name,
          std::vector<int64_t> shape) -> absl::StatusOr<at::Tensor> {
    return checkpoint.LoadTensor(prefix + name, projection_dtype, device, shape);
  };
  LlamaBlockWeights weights;
  POLLEN_ASSIGN_OR_RETURN(weights.input_layernorm,
                          load("input_layernorm.weight", {hidden}));
  POLLEN_ASSIGN_OR_RETURN(
      weights.q_proj,
      load_projection("self_attn.q_proj.weight", {q_out, hidden}));
  POLLEN_ASSIGN_OR_RETURN(
      weights.k_proj,
      load_projection("self_attn.k_proj.weight", {kv_out, hidden}));
  POLLEN_ASSIGN_OR_RETURN(
      weights.v_proj,
      load_projection("self_attn.v_proj.weight", {kv_out, hidden}));
  POLLEN_ASSIGN_OR_RETURN(
      weights.o_proj,
      load_projection("self_attn.o_proj.weight", {hidden, q_out}));
  POLLEN_ASSIGN_OR_RETURN(weights.post_attention_layernorm,
                          load("post_attention_layernorm.weight", {hidden}));
  POLLEN_ASSIGN_OR_RETURN(
      weights.gate_proj,
      load_projection("mlp.gate_proj.weight", {intermediate, hidden}));
  POLLEN_ASSIGN_OR_RETURN(
      weights.up_proj,
      load_projection("mlp.up_proj.weight", {intermediate, hidden}));
  POLLEN_ASSIGN_OR_RETURN(
      weights.down_proj,
      load_projection("mlp.down_proj.weight", {hidden, intermediate}));

  std::unique_ptr<LlamaBlock> block;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("building block ", block_index), [&] {
        block = std::make_unique<LlamaBlock>(block_index, config,
                                             std::move(weights),
                                             std::move(rotary), quantization);
        return absl::OkStatus();
      }));
  return std::move(*block);
}

at::ScalarType LlamaBlock::dtype() const {
  return input_layernorm_.scalar_type();
}

at::Device LlamaBlock::device() const { return input_layernorm_.device(); }

int64_t LlamaBlock::ParameterBytes() const {
  int64_t bytes = static_cast<int64_t>(input_layernorm_.nbytes() +
                                       post_attention_layernorm_.nbytes());
  for (const QuantizedLinear* projection :
       {&qkv_proj_, &o_proj_, &gate_up_proj_, &down_proj_}) {
    bytes += projection->ParameterBytes();
  }
  return bytes;
}

at::Tensor LlamaBlock::RmsNorm(const at::Tensor& x,
                               const at::Tensor& weight) const {
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor variance = x32.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (x32 * at::rsqrt(variance + rms_norm_eps_)).to(x.scalar_type());
}

at::Tensor LlamaBlock::Forward(const at::Tensor& hidden, LayerKvCache& cache,
                               int64_t position,
                               const BlockAdapter* adapter) const {
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(2) == hidden_size_, "block ",
              block_index_, ": hidden states have shape ", hidden.sizes(),
              ", expected [batch, new_tokens, ", hidden_size_, "]");
  SequenceSlice slice;
  slice.cache = &cache;
  slice.position = position;
  slice.batch = hidden.size(0);
  slice.tokens = hidden.size(1);

  // Without adapters, a session is a batch of one slice.
  if (adapter == nullptr) {
    return ForwardBatch(hidden.reshape({-1, hidden_size_}), {slice})
        .view(hidden.sizes());
  }

  const int64_t prefix =
      adapter->prompt.defined() ? adapter->prompt.size(1) : 0;
  if (position >= prefix) return Run(hidden, {slice}, adapter);

  // Deep prompt: the new tokens that fall in [position, prefix) get their
  // prompt rows added, out of place.
  const int64_t overlap = std::min(prefix - position, hidden.size(1));
  const at::Tensor prompt =
      adapter->prompt.narrow(1, position, overlap)
          .to(hidden.device(), hidden.scalar_type());
  at::Tensor prompted = hidden.clone();
  prompted.narrow(1, 0, overlap).add_(prompt);
  return Run(prompted, {slice}, adapter);
}

at::Tensor LlamaBlock::ForwardBatch(
    const at::Tensor& hidden, const std::vector<SequenceSlice>& slices) const {
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == hidden_size_, "block ",
              block_index_, ": batched hidden states have shape ",
              hidden.sizes(), ", expected [rows, ", hidden_size_, "]");
  int64_t rows = 0;
  for (const SequenceSlice& slice : slices) {
    TORCH_CHECK(slice.cache != nullptr, "block ", block_index_,
                ": a batched slice has no KV cache");
    rows += slice.batch * slice.tokens;
  }
  TORCH_CHECK(!slices.empty() && rows == hidden.size(0), "block ",
              block_index_, ": ", slices.size(), " slices hold ", rows,
              " rows, but the hidden states have ", hidden.size(0));

  if (CanRunFloatCpu(hidden, slices)) {
    for (const SequenceSlice& slice : slices) CheckSlice(slice);
    FloatCpuBlock block;
    block.hidden_size = hidden_size_;
    block.num_heads = num_heads_;
    block.num_kv_heads = num_kv_heads_;
    block.head_dim = head_dim_;
    block.rms_norm_eps = rms_norm_eps_;
    // contiguous() returns the tensor itself when it is contiguous already,
    // as loaded weights are.
    block.input_layernorm = input_layernorm_.contiguous();
    block.qkv_proj = qkv_proj_.DequantizedWeight().contiguous();
    block.o_proj = o_proj_.DequantizedWeight().contiguous();
    block.post_attention_layernorm = post_attention_layernorm_.contiguous();
    block.gate_up_proj = gate_up_proj_.DequantizedWeight().contiguous();
    block.down_proj = down_proj_.DequantizedWeight().contiguous();
    block.rotary_cos = rotary_->cos().contiguous();
    block.rotary_sin = rotary_->sin().contiguous();
    block.transposed = transposed_.get();
    return ForwardFloatCpu(block, hidden, slices);
  }
  return Run(hidden, slices, nullptr);
}

bool LlamaBlock::CanRunFloatCpu(
    const at::Tensor& hidden, const std::vector<SequenceSlice>& slices) const {
  if (dtype() != at::kFloat || !device().is_cpu() ||
      quantization() != Quantization::kNone || at::GradMode::is_enabled() ||
      hidden.scalar_type() != at::kFloat || !hidden.device().is_cpu()) {
    return false;
  }
  for (const SequenceSlice& slice : slices) {
    if (slice.tokens > kFloatCpuMaxTokens) return false;
    for (const at::Tensor* tensor : {&slice.cache->keys, &slice.cache->values}) {
      if (!tensor->defined() || tensor->scalar_type() != at::kFloat ||
          !tensor->device().is_cpu() || !tensor->is_contiguous()) {
        return false;
      }
    }
  }
  return true;
}

void LlamaBlock::CheckSlice(const SequenceSlice& slice) const {
  const int64_t total = slice.position + slice.tokens;
  TORCH_CHECK(slice.batch >= 1 && slice.tokens >= 1, "block ", block_index_,
              ": a slice of ", slice.batch, " sequences of ", slice.tokens,
              " tokens is empty");
  const LayerKvCache* cache = slice.cache;
  if (cache == nullptr) {
    TORCH_CHECK(slice.position == 0, "block ", block_index_,
                ": a pass without a cache starts at position 0, not ",
                slice.position);
  } else {
    TORCH_CHECK(cache->keys.defined() && cache->values.defined(), "block ",
                block_index_, ": KV cache is not allocated");
    TORCH_CHECK(cache->keys.dim() == 4, "block ", block_index_,
                ": KV cache keys have shape ", cache->keys.sizes(),
                ", expected [batch, kv_heads, max_length, head_dim]");
    const std::vector<int64_t> cache_shape = {slice.batch, num_kv_heads_,
                                              cache->keys.size(2), head_dim_};
    TORCH_CHECK(cache->keys.sizes() == at::IntArrayRef(cache_shape) &&
                    cache->values.sizes() == cache->keys.sizes(),
                "block ", block_index_, ": KV cache keys ", cache->keys.sizes(),
                " and values ", cache->values.sizes(), " do not match [",
                slice.batch, ", ", num_kv_heads_, ", max_length, ", head_dim_,
                "]");
    TORCH_CHECK(cache->keys.scalar_type() == dtype() &&
                    cache->values.scalar_type() == dtype() &&
                    cache->keys.device() == device() &&
                    cache->values.device() == device(),
                "block ", block_index_, ": KV cache is ",
                cache->keys.scalar_type(), " on ", cache->keys.device(),
                ", expected ", dtype(), " on ", device());
    TORCH_CHECK(slice.position >= 0 && total <= cache->keys.size(2), "block ",
                block_index_, ": positions [", slice.position, ", ", total,
                ") do not fit a KV cache of length ", cache->keys.size(2));
  }
  TORCH_CHECK(total <= rotary_->max_positions(), "block ", block_index_,
              ": positions [", slice.position, ", ", total,
              ") exceed the rotary table of ", rotary_->max_positions(),
              " positions");
}

at::Tensor LlamaBlock::ForwardNoCache(const at::Tensor& hidden,
                                      const BlockAdapter* adapter) const {
  TORCH_CHECK(hidden.dim() == 3, "block ", block_index_,
              ": hidden states have shape ", hidden.sizes(),
              ", expected [batch, seq, ", hidden_size_, "]");
  SequenceSlice slice;
  slice.batch = hidden.size(0);
  slice.tokens = hidden.size(1);
  if (adapter == nullptr || !adapter->prompt.defined()) {
    return Run(hidden, {slice}, adapter);
  }

  // Deep prompt: add it to the first prefix_len positions, out of place.
  const at::Tensor prompt = adapter->prompt.to(hidden.device(),
                                               hidden.scalar_type());
  const int64_t seq = hidden.size(1);
  TORCH_CHECK(prompt.dim() == 3 && prompt.size(1) <= seq &&
                  prompt.size(2) == hidden_size_ &&
                  (prompt.size(0) == 1 || prompt.size(0) == hidden.size(0)),
              "block ", block_index_, ": prompt has shape ", prompt.sizes(),
              ", expected [1 or ", hidden.size(0), ", prefix_len <= ", seq,
              ", ", hidden_size_, "]");
  const int64_t prefix = prompt.size(1);
  const at::Tensor prompted =
      at::cat({hidden.narrow(1, 0, prefix) + prompt,
               hidden.narrow(1, prefix, seq - prefix)},
              1);
  return Run(prompted, {slice}, adapter);
}

at::Tensor LlamaBlock::Run(const at::Tensor& hidden,
                           const std::vector<SequenceSlice>& slices,
                           const BlockAdapter* adapter) const {
  TORCH_CHECK((hidden.dim() == 3 || hidden.dim() == 2) &&
                  hidden.size(-1) == hidden_size_,
              "block ", block_index_, ": hidden states have shape ",
              hidden.sizes(), ", expected [batch, new_tokens, ", hidden_size_,
              "] or [rows, ", hidden_size_, "]");
  TORCH_CHECK(hidden.scalar_type() == dtype() && hidden.device() == device(),
              "block ", block_index_, ": hidden states are ",
              hidden.scalar_type(), " on ", hidden.device(), ", expected ",
              dtype(), " on ", device());

  // Attention sublayer with residual.
  const at::Tensor attention =
      Attention(RmsNorm(hidden, input_layernorm_), slices, adapter);
  const at::Tensor after_attention = hidden + attention;

  // SwiGLU MLP sublayer with residual: down(silu(gate(x)) * up(x)).
  const int64_t intermediate = down_proj_.in_features();
  const at::Tensor normed = RmsNorm(after_attention, post_attention_layernorm_);
  const at::Tensor gate_up = gate_up_proj_.Forward(normed);
  const at::Tensor gate =
      AddDelta(gate_up.narrow(-1, 0, intermediate),
               LoraDelta(normed, adapter, "gate_proj"));
  const at::Tensor up =
      AddDelta(gate_up.narrow(-1, intermediate, intermediate),
               LoraDelta(normed, adapter, "up_proj"));
  const at::Tensor activated = at::silu(gate) * up;
  const at::Tensor mlp =
      AddDelta(down_proj_.Forward(activated),
               LoraDelta(activated, adapter, "down_proj"));
  return after_attention + mlp;
}

at::Tensor LlamaBlock::Attention(const at::Tensor& x,
                                 const std::vector<SequenceSlice>& slices,
                                 const BlockAdapter* adapter) const {
  const int64_t d = head_dim_;
  const int64_t q_width = num_heads_ * d;
  const int64_t kv_width = num_kv_heads_ * d;

  // Projections of all rows: [rows, heads * d] for q, [rows, kv_heads * d]
  // for k and v.
  const at::Tensor qkv = qkv_proj_.Forward(x);
  const at::Tensor q = AddDelta(qkv.narrow(-1, 0, q_width),
                                LoraDelta(x, adapter, "q_proj"))
                           .reshape({-1, q_width});
  const at::Tensor k = AddDelta(qkv.narrow(-1, q_width, kv_width),
                                LoraDelta(x, adapter, "k_proj"))
                           .reshape({-1, kv_width});
  const at::Tensor v = AddDelta(qkv.narrow(-1, q_width + kv_width, kv_width),
                                LoraDelta(x, adapter, "v_proj"))
                           .reshape({-1, kv_width});

  // Attention per slice, on its own rows, cache and positions.
  std::vector<at::Tensor> contexts;
  contexts.reserve(slices.size());
  int64_t row = 0;
  for (const SequenceSlice& slice : slices) {
    CheckSlice(slice);
    const int64_t rows = slice.batch * slice.tokens;
    TORCH_CHECK(row + rows <= q.size(0), "block ", block_index_,
                ": the slices hold more rows than the ", q.size(0),
                " hidden states");
    contexts.push_back(AttendSlice(
        q.narrow(0, row, rows).view({slice.batch, slice.tokens, num_heads_, d}),
        k.narrow(0, row, rows)
            .view({slice.batch, slice.tokens, num_kv_heads_, d}),
        v.narrow(0, row, rows)
            .view({slice.batch, slice.tokens, num_kv_heads_, d}),
        slice));
    row += rows;
  }
  TORCH_CHECK(row == q.size(0), "block ", block_index_, ": the slices hold ",
              row, " rows, but the hidden states have ", q.size(0));

  // Heads back to the shape of x, with heads * d features, for o_proj.
  std::vector<int64_t> context_shape(x.sizes().begin(), x.sizes().end());
  context_shape.back() = q_width;
  const at::Tensor context =
      (contexts.size() == 1 ? contexts[0] : at::cat(contexts, 0))
          .view(context_shape);
  return AddDelta(o_proj_.Forward(context),
                  LoraDelta(context, adapter, "o_proj"));
}

at::Tensor LlamaBlock::AttendSlice(at::Tensor q, at::Tensor k,
                                   const at::Tensor& v,
                                   const SequenceSlice& slice) const {
  const int64_t batch = slice.batch;
  const int64_t new_tokens = slice.tokens;
  const int64_t position = slice.position;
  const int64_t total = position + new_tokens;
  const int64_t group = num_heads_ / num_kv_heads_;
  const int64_t d = head_dim_;
  LayerKvCache* cache = slice.cache;

  // Rotary embedding of q and k at their absolute positions.
  const at::Tensor cos =
      rotary_->cos().narrow(0, position, new_tokens).view({1, new_tokens, 1, d});
  const at::Tensor sin =
      rotary_->sin().narrow(0, position, new_tokens).view({1, new_tokens, 1, d});
  q = q * cos + RotateHalf(q) * sin;
  k = k * cos + RotateHalf(k) * sin;

  // Append to the cache, then view all positions so far:
  // keys, values [batch, kv_heads, total, d]. Without a cache, the new
  // tokens are all there is.
  at::Tensor keys;
  at::Tensor values;
  if (cache != nullptr) {
    cache->keys.narrow(2, position, new_tokens).copy_(k.transpose(1, 2));
    cache->values.narrow(2, position, new_tokens).copy_(v.transpose(1, 2));
    keys = cache->keys.narrow(2, 0, total);
    values = cache->values.narrow(2, 0, total);
  } else {
    keys = k.transpose(1, 2);
    values = v.transpose(1, 2);
  }

  // Grouped-query attention without repeating the keys: query head h uses
  // kv head h / group, so the group's query heads become extra rows.
  // scores[b, g, r, s] = sum_d q[b, g, r, d] * keys[b, g, s, d] / sqrt(d),
  // with r = (head within group) * new_tokens + token.
  const at::Tensor grouped_q = q.view({batch, new_tokens, num_kv_heads_, group, d})
                                   .permute({0, 2, 3, 1, 4})
                                   .reshape({batch, num_kv_heads_,
                                             group * new_tokens, d});
  at::Tensor scores = at::matmul(grouped_q, keys.transpose(-1, -2)) *
                      (1.0 / std::sqrt(static_cast<double>(d)));

  // Causal mask: the token at position + t attends to cache positions up to
  // position + t. A single new token attends to every cached position, so
  // decode needs no mask.
  if (new_tokens > 1) {
    const auto index_options =
        at::TensorOptions().dtype(at::kLong).device(device());
    const at::Tensor key_positions = at::arange(total, index_options);
    const at::Tensor query_positions =
        at::arange(position, total, index_options).unsqueeze(1);
    const at::Tensor future = key_positions > query_positions;  // [t, total]
    scores = scores.view({batch, num_kv_heads_, group, new_tokens, total})
                 .masked_fill(future, -std::numeric_limits<double>::infinity())
                 .view({batch, num_kv_heads_, group * new_tokens, total});
  }

  // Softmax in float32, weighted sum of values, then heads back to
  // [batch * new_tokens, heads * d].
  const at::Tensor probs =
      at::softmax(scores, -1, at::kFloat).to(scores.scalar_type());
  return at::matmul(probs, values)
      .view({batch, num_kv_heads_, group, new_tokens, d})
      .permute({0, 3, 1, 2, 4})
      .reshape({batch * new_tokens, num_heads_ * d});
}

}  // namespace pollen::node
