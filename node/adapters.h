// Trainable additions to Llama blocks that clients own and send with each
// request: deep prompts and LoRA weights. A node applies them to one request
// (or one inference session) and keeps nothing afterwards.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <google/protobuf/repeated_field.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "pollen/v1/pollen.pb.h"

namespace pollen::node {

class BlockSpan;

// Low-rank update of one linear projection W [out, in]:
// y = W x + scaling * B (A x).
struct LoraAdapter {
  at::Tensor a;  // [rank, in]
  at::Tensor b;  // [out, rank]
  double scaling = 1;
};

// One block's trainable additions, as tensors of any float dtype on any
// device; blocks convert them to their own dtype and device when they run,
// so gradients come back in the adapter's dtype (float32 for training).
struct BlockAdapter {
  at::Tensor prompt;  // undefined or [batch or 1, prefix_len, hidden]
  // By target: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
  std::map<std::string, LoraAdapter> lora;
};

// The projections a LoRA adapter may target, in block order.
inline constexpr const char* kLoraTargets[] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

// [out_features, in_features] of projection `target` in a block of
// `config`; INVALID_ARGUMENT naming the known targets when it is unknown.
absl::StatusOr<std::pair<int64_t, int64_t>> LoraTargetShape(
    const ModelConfig& config, const std::string& target);

// Parses and validates adapters for blocks [first_block, end_block) and
// inputs of `batch` sequences of `seq_len` positions: each block once and
// within the range, known targets each at most once, a [rank, in] and b
// [out, rank] with 1 <= rank <= min(in, out), prompt [1 or batch,
// prefix_len, hidden] with 1 <= prefix_len <= seq_len. Returns float32 CPU
// tensors, or INVALID_ARGUMENT naming the block, the target and the
// expected and actual shapes.
absl::StatusOr<std::map<int, BlockAdapter>> AdaptersFromProto(
    const google::protobuf::RepeatedPtrField<v1::BlockAdapters>& protos,
    const ModelConfig& config, int first_block, int end_block, int64_t batch,
    int64_t seq_len);

// Writes `adapters` (in block order, LoRA targets in name order) into
// `protos`, which it clears first. Undefined tensors are left unset.
absl::Status AdaptersToProto(
    const std::map<int, BlockAdapter>& adapters,
    google::protobuf::RepeatedPtrField<v1::BlockAdapters>* protos);

// Copies of `adapters` with every tensor converted to `dtype` on `device`.
std::map<int, BlockAdapter> AdaptersTo(
    const std::map<int, BlockAdapter>& adapters, at::ScalarType dtype,
    at::Device device);

// Gradients returned by RunBackward.
struct BackwardResult {
  at::Tensor grad_inputs;  // [batch, seq, hidden], dtype and device of inputs
  // Same blocks, targets and defined tensors as the adapters passed in, each
  // tensor holding dLoss / d(that tensor) in the adapter's dtype and device.
  std::map<int, BlockAdapter> grad_adapters;
};

// Recomputes blocks [from, to) of `span` on `inputs` [batch, seq, hidden]
// with `adapters` under autograd, whatever the caller's grad mode, and
// back-propagates `grad_outputs` (same shape as the outputs). Leaves its
// arguments untouched. Returns INVALID_ARGUMENT for mismatched shapes and
// INTERNAL (RESOURCE_EXHAUSTED when out of memory) when libtorch fails.
absl::StatusOr<BackwardResult> RunBackward(
    const BlockSpan& span, int from, int to, const at::Tensor& inputs,
    const std::map<int, BlockAdapter>& adapters,
    const at::Tensor& grad_outputs);

}  // namespace pollen::node
