#include "node/adapters.h"

#include <cmath>
#include <set>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"
#include "node/block_span.h"

namespace pollen::node {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Parses one adapter tensor into float32 on the CPU.
absl::StatusOr<at::Tensor> ParseFloat32(const v1::Tensor& proto,
                                        const std::string& what) {
  POLLEN_ASSIGN_OR_RETURN(at::Tensor tensor, TensorFromProto(proto, what));
  return tensor.to(at::kFloat);
}

absl::StatusOr<LoraAdapter> LoraFromProto(const v1::LoraWeights& proto,
                                          const ModelConfig& config,
                                          int block) {
  const std::string& target = proto.target();
  POLLEN_ASSIGN_OR_RETURN(const auto out_in, LoraTargetShape(config, target));
  const auto [out, in] = out_in;
  const std::string where = absl::StrCat("block ", block, " LoRA ", target);

  if (!proto.has_a() || !proto.has_b()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, " lacks tensor ", proto.has_a() ? "b" : "a"));
  }
  LoraAdapter lora;
  POLLEN_ASSIGN_OR_RETURN(lora.a, ParseFloat32(proto.a(), where + " a"));
  POLLEN_ASSIGN_OR_RETURN(lora.b, ParseFloat32(proto.b(), where + " b"));
  lora.scaling = proto.scaling();

  // a [rank, in], b [out, rank], 1 <= rank <= min(in, out).
  const int64_t max_rank = std::min(in, out);
  if (lora.a.dim() != 2 || lora.a.size(1) != in || lora.a.size(0) < 1 ||
      lora.a.size(0) > max_rank) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " a has shape ", ShapeString(lora.a.sizes()),
        ", expected [rank, ", in, "] with 1 <= rank <= ", max_rank));
  }
  const int64_t rank = lora.a.size(0);
  if (lora.b.dim() != 2 || lora.b.size(0) != out || lora.b.size(1) != rank) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, " b has shape ", ShapeString(lora.b.sizes()),
                     ", expected [", out, ", ", rank, "] (rank ", rank,
                     " from a)"));
  }
  if (!std::isfinite(lora.scaling)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, " scaling ", lora.scaling, " is not finite"));
  }
  return lora;
}

// Fresh leaves that require grad, holding the values of `adapters`.
std::map<int, BlockAdapter> GradLeaves(
    const std::map<int, BlockAdapter>& adapters,
    std::vector<at::Tensor>* leaves) {
  auto leaf = [leaves](const at::Tensor& tensor) {
    at::Tensor copy = tensor.detach().requires_grad_(true);
    leaves->push_back(copy);
    return copy;
  };
  std::map<int, BlockAdapter> copies;
  for (const auto& [block, adapter] : adapters) {
    BlockAdapter& copy = copies[block];
    if (adapter.prompt.defined()) copy.prompt = leaf(adapter.prompt);
    for (const auto& [target, lora] : adapter.lora) {
      LoraAdapter& lora_copy = copy.lora[target];
      lora_copy.a = leaf(lora.a);
      lora_copy.b = leaf(lora.b);
      lora_copy.scaling = lora.scaling;
    }
  }
  return copies;
}

}  // namespace

absl::StatusOr<std::pair<int64_t, int64_t>> LoraTargetShape(
    const ModelConfig& config, const std::string& target) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  const int64_t intermediate = config.intermediate_size;
  if (target == "q_proj") return std::make_pair(q_out, hidden);
  if (target == "k_proj") return std::make_pair(kv_out, hidden);
  if (target == "v_proj") return std::make_pair(kv_out, hidden);
  if (target == "o_proj") return std::make_pair(hidden, q_out);
  if (target == "gate_proj") return std::make_pair(intermediate, hidden);
  if (target == "up_proj") return std::make_pair(intermediate, hidden);
  if (target == "down_proj") return std::make_pair(hidden, intermediate);
  return absl::InvalidArgumentError(absl::StrCat(
      "LoRA target '", target, "' is unknown; use one of ",
      absl::StrJoin(std::begin(kLoraTargets), std::end(kLoraTargets), ", ")));
}

absl::StatusOr<std::map<int, BlockAdapter>> AdaptersFromProto(
    const google::protobuf::RepeatedPtrField<v1::BlockAdapters>& protos,
    const ModelConfig& config, int first_block, int end_block, int64_t batch,
    int64_t seq_len) {
  std::map<int, BlockAdapter> adapters;
  for (const v1::BlockAdapters& proto : protos) {
    // Block index: inside the range, once.
    const int64_t block = proto.block();
    if (block < first_block || block >= end_block) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapters for block ", block, " are outside the requested blocks [",
          first_block, ", ", end_block, ")"));
    }
    if (adapters.count(static_cast<int>(block)) > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapters for block ", block, " appear twice"));
    }
    BlockAdapter& adapter = adapters[static_cast<int>(block)];

    // Deep prompt [1 or batch, prefix_len, hidden].
    if (proto.has_prompt()) {
      const std::string what = absl::StrCat("block ", block, " prompt");
      POLLEN_ASSIGN_OR_RETURN(adapter.prompt, ParseFloat32(proto.prompt(), what));
      const at::Tensor& prompt = adapter.prompt;
      if (prompt.dim() != 3 ||
          (prompt.size(0) != 1 && prompt.size(0) != batch) ||
          prompt.size(1) < 1 || prompt.size(1) > seq_len ||
          prompt.size(2) != config.hidden_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, " has shape ", ShapeString(prompt.sizes()), ", expected [1 or ",
            batch, ", prefix_len in 1..", seq_len, " (the sequence length), ",
            config.hidden_size, "]"));
      }
    }

    // LoRA weights, each target once.
    for (const v1::LoraWeights& lora_proto : proto.lora()) {
      if (adapter.lora.count(lora_proto.target()) > 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "block ", block, " has two LoRA adapters for ", lora_proto.target()));
      }
      POLLEN_ASSIGN_OR_RETURN(
          LoraAdapter lora,
          LoraFromProto(lora_proto, config, static_cast<int>(block)));
      adapter.lora.emplace(lora_proto.target(), std::move(lora));
    }
  }
  return adapters;
}

absl::Status AdaptersToProto(
    const std::map<int, BlockAdapter>& adapters,
    google::protobuf::RepeatedPtrField<v1::BlockAdapters>* protos) {
  protos->Clear();
  for (const auto& [block, adapter] : adapters) {
    v1::BlockAdapters* proto = protos->Add();
    proto->set_block(static_cast<uint32_t>(block));
    if (adapter.prompt.defined()) {
      POLLEN_RETURN_IF_ERROR(
          TensorToProto(adapter.prompt, proto->mutable_prompt()));
    }
    for (const auto& [target, lora] : adapter.lora) {
      v1::LoraWeights* lora_proto = proto->add_lora();
      lora_proto->set_target(target);
      lora_proto->set_scaling(static_cast<float>(lora.scaling));
      if (lora.a.defined()) {
        POLLEN_RETURN_IF_ERROR(TensorToProto(lora.a, lora_proto->mutable_a()));
      }
      if (lora.b.defined()) {
        POLLEN_RETURN_IF_ERROR(TensorToProto(lora.b, lora_proto->mutable_b()));
      }
    }
  }
  return absl::OkStatus();
}

std::map<int, BlockAdapter> AdaptersTo(
    const std::map<int, BlockAdapter>& adapters, at::ScalarType dtype,
    at::Device device) {
  std::map<int, BlockAdapter> converted;
  for (const auto& [block, adapter] : adapters) {
    BlockAdapter& copy = converted[block];
    if (adapter.prompt.defined()) copy.prompt = adapter.prompt.to(device, dtype);
    for (const auto& [target, lora] : adapter.lora) {
      copy.lora[target] = LoraAdapter{lora.a.to(device, dtype),
                                      lora.b.to(device, dtype), lora.scaling};
    }
  }
  return converted;
}

absl::StatusOr<BackwardResult> RunBackward(
    const BlockSpan& span, int from, int to, const at::Tensor& inputs,
    const std::map<int, BlockAdapter>& adapters,
    const at::Tensor& grad_outputs) {
  if (!inputs.defined() || !grad_outputs.defined() ||
      grad_outputs.sizes() != inputs.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grad_outputs have shape ",
        grad_outputs.defined() ? ShapeString(grad_outputs.sizes()) : "undefined",
        ", expected the output shape ",
        inputs.defined() ? ShapeString(inputs.sizes()) : "undefined"));
  }

  at::AutoGradMode grad_mode(/*enabled=*/true);

  // Leaves: the inputs first, then every adapter tensor in map order.
  std::vector<at::Tensor> leaves;
  const at::Tensor input_leaf = inputs.detach().requires_grad_(true);
  leaves.push_back(input_leaf);
  const std::map<int, BlockAdapter> leaf_adapters = GradLeaves(adapters, &leaves);

  POLLEN_ASSIGN_OR_RETURN(at::Tensor outputs,
                          span.ForwardNoCache(input_leaf, from, to, leaf_adapters));

  std::vector<at::Tensor> grads;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("backward through blocks [", from, ", ", to,
                   ") on inputs ", ShapeString(inputs.sizes())),
      [&] {
        grads = torch::autograd::grad(
            {outputs}, leaves, {grad_outputs.to(outputs.options())},
            /*retain_graph=*/false, /*create_graph=*/false,
            /*allow_unused=*/true);
        for (size_t i = 0; i < grads.size(); ++i) {
          if (!grads[i].defined()) grads[i] = at::zeros_like(leaves[i]);
        }
        return absl::OkStatus();
      }));

  // Put the gradients back in the adapters' structure, in the same order.
  BackwardResult result;
  size_t next = 0;
  result.grad_inputs = grads[next++];
  for (const auto& [block, adapter] : adapters) {
    BlockAdapter& grad = result.grad_adapters[block];
    if (adapter.prompt.defined()) grad.prompt = grads[next++];
    for (const auto& [target, lora] : adapter.lora) {
      LoraAdapter& grad_lora = grad.lora[target];
      grad_lora.a = grads[next++];
      grad_lora.b = grads[next++];
      grad_lora.scaling = lora.scaling;
    }
  }
  return result;
}

}  // namespace pollen::node
