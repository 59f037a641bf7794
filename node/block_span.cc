#include "node/block_span.h"

#include <cstring>
#include <string>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#include "common/dtype.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::node {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status CheckDtype(at::ScalarType dtype, const at::Device& device) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    return absl::InvalidArgumentError(
        absl::StrCat("block dtype ", c10::toString(dtype),
                     " is not supported; use float32, bfloat16 or float16"));
  }
  // libtorch 1.13.1 raises "addmm_impl_cpu_ not implemented for 'Half'" on
  // the CPU.
  if (dtype == at::kHalf && device.is_cpu()) {
    return absl::InvalidArgumentError(
        "float16 blocks need a GPU; on the CPU use float32 or bfloat16");
  }
  return absl::OkStatus();
}

// Returns the output `state` of blocks [from, to) on the device and in the
// dtype of their input `hidden`.
absl::StatusOr<at::Tensor> ToInputDtype(const at::Tensor& state,
                                        const at::Tensor& hidden, int from,
                                        int to) {
  at::Tensor result;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("converting the output of blocks [", from, ", ", to,
                   ") back to ", c10::toString(hidden.scalar_type())),
      [&] {
        result = state.to(hidden.device(), hidden.scalar_type());
        return absl::OkStatus();
      }));
  return result;
}

}  // namespace

BlockSpan::BlockSpan(int start, int end, ModelConfig config,
                     at::ScalarType dtype, at::Device device,
                     Quantization quantization,
                     std::vector<LlamaBlock> blocks)
    : start_(start),
      end_(end),
      config_(std::move(config)),
      dtype_(dtype),
      device_(device),
      quantization_(quantization),
      blocks_(std::move(blocks)) {}

absl::StatusOr<std::unique_ptr<BlockSpan>> BlockSpan::Load(
    const Checkpoint& checkpoint, int start, int end, at::ScalarType dtype,
    at::Device device, Quantization quantization) {
  const ModelConfig& config = checkpoint.config();
  if (start < 0 || end > config.num_hidden_layers || start >= end) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block span [", start, ", ", end, ") is invalid for ",
        checkpoint.dir(), ", which has ", config.num_hidden_layers,
        " blocks; need 0 <= start < end <= ", config.num_hidden_layers));
  }
  POLLEN_RETURN_IF_ERROR(CheckDtype(dtype, device));

  // One rotary table serves every block of the span.
  std::shared_ptr<const RotaryEmbedding> rotary;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("computing the rotary table for ",
                   config.max_position_embeddings, " positions"),
      [&] {
        rotary = std::make_shared<const RotaryEmbedding>(
            config, config.max_position_embeddings, dtype, device);
        return absl::OkStatus();
      }));

  std::vector<LlamaBlock> blocks;
  blocks.reserve(end - start);
  for (int index = start; index < end; ++index) {
    POLLEN_ASSIGN_OR_RETURN(
        LlamaBlock block,
        LlamaBlock::Load(checkpoint, index, dtype, device, rotary,
                         quantization));
    blocks.push_back(std::move(block));
  }

  std::unique_ptr<BlockSpan> span(new BlockSpan(
      start, end, config, dtype, device, quantization, std::move(blocks)));
  POLLEN_LOG_DEBUG("Loaded blocks [{}, {}) of {}: {} bytes of weights "
                   "computing in {} (quantization {}) on {}",
                   start, end, checkpoint.dir(), span->ParameterBytes(),
                   DtypeName(dtype), QuantizationName(quantization),
                   device.str());
  return span;
}

int64_t BlockSpan::ParameterBytes() const {
  int64_t bytes = 0;
  for (const LlamaBlock& block : blocks_) bytes += block.ParameterBytes();
  return bytes;
}

int64_t BlockSpan::CacheBytesPerTokenPerBlock() const {
  return 2 * config_.num_key_value_heads * config_.head_dim *
         static_cast<int64_t>(c10::elementSize(dtype_));
}

std::vector<LayerKvCache> BlockSpan::AllocateCache(int from, int to,
                                                   int64_t batch,
                                                   int64_t max_length) const {
  std::vector<LayerKvCache> cache;
  if (from < start_ || to > end_ || from >= to || batch <= 0 ||
      max_length <= 0) {
    return cache;
  }
  const auto options = at::TensorOptions().dtype(dtype_).device(device_);
  const std::vector<int64_t> shape = {batch, config_.num_key_value_heads,
                                      max_length, config_.head_dim};
  cache.reserve(to - from);
  for (int index = from; index < to; ++index) {
    cache.push_back(
        LayerKvCache{at::zeros(shape, options), at::zeros(shape, options)});
  }
  return cache;
}

absl::Status BlockSpan::ValidateForward(const at::Tensor& hidden,
                                        const std::vector<LayerKvCache>& cache,
                                        int64_t position, int from,
                                        int to) const {
  // Block range and cache count.
  if (from < start_ || to > end_ || from >= to) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blocks [", from, ", ", to, ") are not a non-empty part of the span [",
        start_, ", ", end_, ")"));
  }
  if (cache.size() != static_cast<size_t>(to - from)) {
    return absl::InvalidArgumentError(
        absl::StrCat("got ", cache.size(), " KV caches for blocks [", from,
                     ", ", to, "), expected ", to - from));
  }

  // Hidden states.
  if (!hidden.defined() || hidden.dim() != 3 ||
      hidden.size(2) != config_.hidden_size || hidden.size(0) < 1 ||
      hidden.size(1) < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hidden states have shape ",
        hidden.defined() ? ShapeString(hidden.sizes()) : "undefined",
        ", expected [batch >= 1, new_tokens >= 1, ", config_.hidden_size,
        "]"));
  }
  if (!at::isFloatingType(hidden.scalar_type())) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden states have dtype ",
                     c10::toString(hidden.scalar_type()),
                     ", expected a floating-point dtype"));
  }

  // Positions against the rotary table and each cache.
  const int64_t batch = hidden.size(0);
  const int64_t total = position + hidden.size(1);
  if (position < 0 || total > config_.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "positions [", position, ", ", total,
        ") are outside the model's max_position_embeddings of ",
        config_.max_position_embeddings));
  }
  const std::vector<int64_t> expected_prefix = {batch,
                                                config_.num_key_value_heads};
  for (size_t i = 0; i < cache.size(); ++i) {
    const LayerKvCache& layer = cache[i];
    const int block = from + static_cast<int>(i);
    if (!layer.keys.defined() || !layer.values.defined() ||
        layer.keys.dim() != 4 || layer.keys.sizes() != layer.values.sizes() ||
        layer.keys.size(0) != batch ||
        layer.keys.size(1) != config_.num_key_value_heads ||
        layer.keys.size(3) != config_.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KV cache of block ", block, " has keys ",
          layer.keys.defined() ? ShapeString(layer.keys.sizes()) : "undefined",
          " and values ",
          layer.values.defined() ? ShapeString(layer.values.sizes())
                                 : "undefined",
          ", expected [", batch, ", ", config_.num_key_value_heads,
          ", max_length, ", config_.head_dim, "]"));
    }
    if (layer.keys.scalar_type() != dtype_ ||
        layer.values.scalar_type() != dtype_ ||
        layer.keys.device() != device_ || layer.values.device() != device_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KV cache of block ", block, " is ",
          c10::toString(layer.keys.scalar_type()), " on ",
          layer.keys.device().str(), ", expected ", c10::toString(dtype_),
          " on ", device_.str()));
    }
    if (total > layer.keys.size(2)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "positions [", position, ", ", total, ") exceed the KV cache of block ",
          block, ", which holds ", layer.keys.size(2), " positions"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> BlockSpan::Forward(
    const at::Tensor& hidden, std::vector<LayerKvCache>& cache,
    int64_t position, int from, int to,
    const std::map<int, BlockAdapter>* adapters) const {
  // Without adapters, one session is a batch of one.
  if (adapters == nullptr || adapters->empty()) {
    SpanBatchEntry entry;
    entry.hidden = hidden;
    entry.cache = &cache;
    entry.position = position;
    POLLEN_ASSIGN_OR_RETURN(std::vector<at::Tensor> outputs,
                            ForwardBatch({entry}, from, to));
    return std::move(outputs[0]);
  }
  POLLEN_RETURN_IF_ERROR(ValidateForward(hidden, cache, position, from, to));

  // NoGradGuard rather than InferenceMode: outputs of InferenceMode are
  // inference tensors, which callers could not later modify in place.
  at::NoGradGuard no_grad;

  at::Tensor state;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("converting hidden states ", ShapeString(hidden.sizes()),
                   " to ", c10::toString(dtype_), " on ", device_.str()),
      [&] {
        state = hidden.to(device_, dtype_);
        return absl::OkStatus();
      }));

  for (int index = from; index < to; ++index) {
    const LlamaBlock& block = blocks_[index - start_];
    LayerKvCache& layer = cache[index - from];
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("block ", index, " forward on hidden states ",
                     ShapeString(state.sizes()), " at position ", position,
                     " with KV cache ", ShapeString(layer.keys.sizes())),
        [&] {
          const BlockAdapter* adapter = nullptr;
          if (adapters != nullptr) {
            const auto it = adapters->find(index);
            if (it != adapters->end()) adapter = &it->second;
          }
          state = block.Forward(state, layer, position, adapter);
          return absl::OkStatus();
        }));
  }

  return ToInputDtype(state, hidden, from, to);
}

bool BlockSpan::PlainFloatCpu(
    const std::vector<SpanBatchEntry>& entries) const {
  if (dtype_ != at::kFloat || !device_.is_cpu()) return false;
  for (const SpanBatchEntry& entry : entries) {
    const at::Tensor& hidden = entry.hidden;
    if (hidden.scalar_type() != at::kFloat || !hidden.is_cpu() ||
        !hidden.is_contiguous()) {
      return false;
    }
  }
  return true;
}

absl::StatusOr<std::vector<at::Tensor>> BlockSpan::ForwardBatch(
    const std::vector<SpanBatchEntry>& entries, int from, int to) const {
  if (entries.empty()) {
    return absl::InvalidArgumentError("a batched pass needs at least one entry");
  }
  for (const SpanBatchEntry& entry : entries) {
    if (entry.cache == nullptr) {
      return absl::InvalidArgumentError("a batched pass entry has no KV cache");
    }
    POLLEN_RETURN_IF_ERROR(ValidateForward(entry.hidden, *entry.cache,
                                           entry.position, from, to));
  }

  // See Forward for why this is not InferenceMode.
  at::NoGradGuard no_grad;

  // The entries' rows, stacked: [rows, hidden_size] in the span's dtype.
  const int64_t hidden_size = config_.hidden_size;
  std::vector<SequenceSlice> slices(entries.size());
  std::vector<at::Tensor> outputs;
  int current_block = -1;
  const absl::Status status = CatchTorchErrors("", [&] {
    // Float32 CPU rows are copied with memcpy, because each libtorch
    // operator here and below costs about a microsecond, measured.
    const bool plain = PlainFloatCpu(entries);
    int64_t total_rows = 0;
    for (size_t i = 0; i < entries.size(); ++i) {
      const at::Tensor& hidden = entries[i].hidden;
      slices[i].position = entries[i].position;
      slices[i].batch = hidden.size(0);
      slices[i].tokens = hidden.size(1);
      total_rows += hidden.size(0) * hidden.size(1);
    }
    at::Tensor state;
    if (plain) {
      state = at::empty({total_rows, hidden_size},
                        at::TensorOptions().dtype(at::kFloat));
      float* destination = state.data_ptr<float>();
      for (const SpanBatchEntry& entry : entries) {
        const int64_t floats = entry.hidden.numel();
        std::memcpy(destination, entry.hidden.data_ptr<float>(),
                    floats * sizeof(float));
        destination += floats;
      }
    } else {
      std::vector<at::Tensor> rows;
      rows.reserve(entries.size());
      for (const SpanBatchEntry& entry : entries) {
        rows.push_back(
            entry.hidden.to(device_, dtype_).reshape({-1, hidden_size}));
      }
      state = rows.size() == 1 ? rows[0] : at::cat(rows, 0);
    }

    for (int index = from; index < to; ++index) {
      current_block = index;
      for (size_t i = 0; i < entries.size(); ++i) {
        slices[i].cache = &(*entries[i].cache)[index - from];
      }
      state = blocks_[index - start_].ForwardBatch(state, slices);
    }
    current_block = -1;

    // Each entry's rows, back in its shape, dtype and device.
    int64_t row = 0;
    outputs.reserve(entries.size());
    for (const SpanBatchEntry& entry : entries) {
      const at::Tensor& hidden = entry.hidden;
      const int64_t count = hidden.size(0) * hidden.size(1);
      if (plain) {
        at::Tensor output =
            at::empty(hidden.sizes(), at::TensorOptions().dtype(at::kFloat));
        std::memcpy(output.data_ptr<float>(),
                    state.data_ptr<float>() + row * hidden_size,
                    count * hidden_size * sizeof(float));
        outputs.push_back(std::move(output));
      } else {
        outputs.push_back(state.narrow(0, row, count)
                              .view(hidden.sizes())
                              .to(hidden.device(), hidden.scalar_type()));
      }
      row += count;
    }
    return absl::OkStatus();
  });
  if (!status.ok()) {
    // The message of CatchTorchErrors("") starts with ": ".
    const std::string where =
        current_block >= 0
            ? absl::StrCat("block ", current_block, " forward")
            : absl::StrCat("converting the hidden states of blocks [", from,
                           ", ", to, ")");
    return absl::Status(
        status.code(),
        absl::StrCat(where, " of ", entries.size(),
                     " session(s), the first with hidden states ",
                     ShapeString(entries[0].hidden.sizes()), " at position ",
                     entries[0].position, status.message()));
  }
  return outputs;
}

absl::StatusOr<at::Tensor> BlockSpan::ForwardNoCache(
    const at::Tensor& hidden, int from, int to,
    const std::map<int, BlockAdapter>& adapters) const {
  // Block range, hidden states and sequence length.
  if (from < start_ || to > end_ || from >= to) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blocks [", from, ", ", to, ") are not a non-empty part of the span [",
        start_, ", ", end_, ")"));
  }
  if (!hidden.defined() || hidden.dim() != 3 ||
      hidden.size(2) != config_.hidden_size || hidden.size(0) < 1 ||
      hidden.size(1) < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hidden states have shape ",
        hidden.defined() ? ShapeString(hidden.sizes()) : "undefined",
        ", expected [batch >= 1, seq >= 1, ", config_.hidden_size, "]"));
  }
  if (!at::isFloatingType(hidden.scalar_type())) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden states have dtype ",
                     c10::toString(hidden.scalar_type()),
                     ", expected a floating-point dtype"));
  }
  if (hidden.size(1) > config_.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence of ", hidden.size(1),
        " positions exceeds the model's max_position_embeddings of ",
        config_.max_position_embeddings));
  }

  at::Tensor state;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("converting hidden states ", ShapeString(hidden.sizes()),
                   " to ", c10::toString(dtype_), " on ", device_.str()),
      [&] {
        state = hidden.to(device_, dtype_);
        return absl::OkStatus();
      }));

  for (int index = from; index < to; ++index) {
    const LlamaBlock& block = blocks_[index - start_];
    const auto it = adapters.find(index);
    const BlockAdapter* adapter = it == adapters.end() ? nullptr : &it->second;
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("block ", index, " full-sequence forward on hidden states ",
                     ShapeString(state.sizes())),
        [&] {
          state = block.ForwardNoCache(state, adapter);
          return absl::OkStatus();
        }));
  }

  return ToInputDtype(state, hidden, from, to);
}

}  // namespace pollen::node
