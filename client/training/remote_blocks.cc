#include "client/training/remote_blocks.h"

#include <chrono>
#include <utility>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "client/swarm_client.h"
#include "common/logging.h"
#include "common/payload_chunks.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"
#include "client/hop_stream.h"
#include "scheduler/latency_route.h"

namespace pollen::client {
namespace {

constexpr absl::Duration kFetchTimeout = absl::Seconds(5);
constexpr absl::Duration kPollInterval = absl::Milliseconds(500);

// The autograd function over the whole swarm. Inputs: hidden states, then
// the adapter parameters in AdapterSet::Parameters() order.
class SwarmBlocksFunction
    : public torch::autograd::Function<SwarmBlocksFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* context, const at::Tensor& hidden,
      at::TensorList parameters, RemoteBlocks* blocks,
      const AdapterSet* adapters) {
    std::vector<RemoteBlocks::HopInput> hop_inputs;
    auto output = blocks->ForwardPass(hidden, *adapters, 0, -1, &hop_inputs);
    TORCH_CHECK(output.ok(), "forward pass through the swarm failed: ",
                output.status().ToString());
    context->saved_data["blocks"] = reinterpret_cast<int64_t>(blocks);
    context->saved_data["adapters"] = reinterpret_cast<int64_t>(adapters);
    context->saved_data["pass"] = blocks->KeepPass(std::move(hop_inputs));
    return {*output};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* context,
      torch::autograd::variable_list grad_outputs) {
    auto* blocks =
        reinterpret_cast<RemoteBlocks*>(context->saved_data["blocks"].toInt());
    const auto* adapters = reinterpret_cast<const AdapterSet*>(
        context->saved_data["adapters"].toInt());
    const std::vector<RemoteBlocks::HopInput> hop_inputs =
        blocks->TakePass(context->saved_data["pass"].toInt());
    auto gradients =
        blocks->BackwardPass(hop_inputs, *adapters, grad_outputs[0]);
    TORCH_CHECK(gradients.ok(), "backward pass through the swarm failed: ",
                gradients.status().ToString());

    // One gradient per forward input: hidden, each parameter, and none for
    // the two pointers.
    torch::autograd::variable_list result = {gradients->grad_inputs};
    for (const at::Tensor& grad : gradients->grad_parameters) {
      result.push_back(grad);
    }
    result.emplace_back();
    result.emplace_back();
    return result;
  }
};

}  // namespace

RemoteBlocks::RemoteBlocks(SwarmClient& swarm, RemoteBlocksOptions options)
    : swarm_(swarm), options_(std::move(options)), rng_(options_.seed) {}

at::Tensor RemoteBlocks::Run(const at::Tensor& hidden,
                             const AdapterSet& adapters) {
  const std::vector<at::Tensor> parameters = adapters.Parameters();
  return SwarmBlocksFunction::apply(hidden, at::TensorList(parameters), this,
                                    &adapters)[0];
}

int64_t RemoteBlocks::KeepPass(std::vector<HopInput> hop_inputs) {
  last_route_.clear();
  for (const HopInput& hop_input : hop_inputs) {
    last_route_.push_back(hop_input.hop);
  }
  const int64_t id = next_pass_id_++;
  passes_[id] = std::move(hop_inputs);
  return id;
}

std::vector<RemoteBlocks::HopInput> RemoteBlocks::TakePass(int64_t id) {
  std::vector<HopInput> hop_inputs;
  const auto pass = passes_.find(id);
  if (pass == passes_.end()) return hop_inputs;
  hop_inputs = std::move(pass->second);
  passes_.erase(pass);
  return hop_inputs;
}

absl::StatusOr<std::vector<scheduler::RouteHop>> RemoteBlocks::SampleRoute(
    int from, int to) {
  const absl::Time deadline = absl::Now() + options_.discovery_wait;
  absl::Status last_error;
  while (true) {
    auto records =
        swarm_.registry().FetchSpan(options_.model_id, from, to, kFetchTimeout);
    if (records.ok()) {
      scheduler::RouteOptions route_options;
      route_options.excluded_nodes = swarm_.BannedNodes(absl::Now());
      auto route = scheduler::SampleThroughputRoute(
          SpansFromRecords(*records, options_.model_id), from, to,
          /*queued_requests=*/{}, rng_, route_options);
      if (route.ok()) return route;
      last_error = route.status();
    } else {
      last_error = records.status();
    }
    if (absl::Now() + kPollInterval > deadline) break;
    absl::SleepFor(kPollInterval);
  }
  return absl::Status(last_error.code(),
                      absl::StrCat("model '", options_.model_id,
                                   "': ", last_error.message()));
}

absl::StatusOr<v1::ForwardRequest> RemoteBlocks::MakeRequest(
    const scheduler::RouteHop& hop, const at::Tensor& input,
    const AdapterSet& adapters) const {
  v1::ForwardRequest request;
  request.set_model_id(options_.model_id);
  request.mutable_blocks()->set_start(hop.start);
  request.mutable_blocks()->set_end(hop.end);
  request.set_compression(options_.compression);
  POLLEN_RETURN_IF_ERROR(TensorToProto(input.detach().contiguous(),
                                       request.mutable_hidden_states(),
                                       options_.compression));
  POLLEN_RETURN_IF_ERROR(AppendBlockAdapters(adapters, hop.start, hop.end,
                                             request.mutable_adapters()));
  return request;
}

absl::Status RemoteBlocks::Call(const scheduler::RouteHop& hop, bool backward,
                                const google::protobuf::MessageLite& request,
                                google::protobuf::MessageLite* response) {
  auto stub = v1::BlockService::NewStub(channels_.Get(hop.server.address));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoMilliseconds(options_.call_timeout));
  auto stream = backward ? stub->Backward(&context) : stub->Forward(&context);
  for (const v1::PayloadChunk& chunk : SplitMessage(request)) {
    if (!stream->Write(chunk)) break;
  }
  stream->WritesDone();
  Reassembler reassembler;
  v1::PayloadChunk chunk;
  while (!reassembler.complete() && stream->Read(&chunk)) {
    POLLEN_RETURN_IF_ERROR(reassembler.Add(chunk));
  }
  const grpc::Status status = stream->Finish();
  if (!status.ok()) {
    const absl::Status error = FromGrpcStatus(status);
    return absl::Status(error.code(), absl::StrCat(DescribeHop(hop), ": ",
                                                   error.message()));
  }
  POLLEN_ASSIGN_OR_RETURN(std::string serialized, reassembler.Take());
  return ParseMessage(serialized,
                      absl::StrCat(backward ? "Backward" : "Forward",
                                   " response of ", DescribeHop(hop)),
                      response);
}

absl::StatusOr<at::Tensor> RemoteBlocks::ForwardPass(
    const at::Tensor& hidden, const AdapterSet& adapters, int from, int to,
    std::vector<HopInput>* hop_inputs) {
  if (to < 0) to = options_.num_blocks;
  at::Tensor current = hidden.detach().to(at::kCPU, at::kFloat).contiguous();
  int block = from;
  int failures = 0;
  while (block < to) {
    POLLEN_ASSIGN_OR_RETURN(std::vector<scheduler::RouteHop> route,
                            SampleRoute(block, to));
    for (const scheduler::RouteHop& hop : route) {
      POLLEN_ASSIGN_OR_RETURN(v1::ForwardRequest request,
                              MakeRequest(hop, current, adapters));
      v1::ForwardResponse response;
      const absl::Status status = Call(hop, /*backward=*/false, request,
                                       &response);
      if (!status.ok()) {
        if (!IsFailoverError(status) || ++failures > options_.max_failovers) {
          return status;
        }
        // Ban the node and route the remaining blocks again.
        POLLEN_LOG_WARN("Forward on {} failed, rerouting: {}",
                        DescribeHop(hop), status.ToString());
        swarm_.ReportFailure(hop.server.node_id);
        ++failovers_;
        break;
      }
      POLLEN_ASSIGN_OR_RETURN(
          at::Tensor output,
          TensorFromProto(response.hidden_states(),
                          absl::StrCat("output of ", DescribeHop(hop))));
      if (hop_inputs != nullptr) hop_inputs->push_back({hop, current});
      current = output.to(at::kFloat);
      block = hop.end;
    }
  }
  return current;
}

absl::Status RemoteBlocks::AccumulateGradients(
    const v1::BackwardResponse& response, const AdapterSet& adapters,
    Gradients* gradients) const {
  // Parameter positions in AdapterSet::Parameters() order.
  const int prompt_index = adapters.prompt.defined() ? 0 : -1;
  const int deep_index =
      adapters.deep_prompt.defined() ? prompt_index + 1 : -1;
  std::map<std::pair<int, std::string>, int> lora_index;
  int next = std::max(prompt_index, deep_index) + 1;
  for (const auto& [block, pairs] : adapters.lora) {
    for (const auto& [target, pair] : pairs) {
      lora_index[{block, target}] = next;
      next += 2;
    }
  }

  for (const v1::BlockAdapters& proto : response.grad_adapters()) {
    const int block = static_cast<int>(proto.block());
    if (proto.has_prompt() && deep_index >= 0) {
      POLLEN_ASSIGN_OR_RETURN(at::Tensor grad,
                              TensorFromProto(proto.prompt(), "prompt grad"));
      gradients->grad_parameters[deep_index][block] +=
          grad.to(at::kFloat).sum(0);
    }
    for (const v1::LoraWeights& weights : proto.lora()) {
      const auto index = lora_index.find({block, weights.target()});
      if (index == lora_index.end()) {
        return absl::InternalError(absl::StrCat(
            "gradient for LoRA ", weights.target(), " of block ", block,
            " that the request did not send"));
      }
      POLLEN_ASSIGN_OR_RETURN(at::Tensor grad_a,
                              TensorFromProto(weights.a(), "LoRA A grad"));
      POLLEN_ASSIGN_OR_RETURN(at::Tensor grad_b,
                              TensorFromProto(weights.b(), "LoRA B grad"));
      gradients->grad_parameters[index->second] += grad_a.to(at::kFloat);
      gradients->grad_parameters[index->second + 1] += grad_b.to(at::kFloat);
    }
  }
  return absl::OkStatus();
}

absl::Status RemoteBlocks::BackwardHop(const HopInput& hop_input,
                                       const AdapterSet& adapters,
                                       const at::Tensor& grad_outputs,
                                       Gradients* gradients) {
  v1::BackwardRequest request;
  POLLEN_ASSIGN_OR_RETURN(
      *request.mutable_forward(),
      MakeRequest(hop_input.hop, hop_input.input, adapters));
  POLLEN_RETURN_IF_ERROR(TensorToProto(grad_outputs.contiguous(),
                                       request.mutable_grad_outputs(),
                                       options_.compression));
  v1::BackwardResponse response;
  POLLEN_RETURN_IF_ERROR(
      Call(hop_input.hop, /*backward=*/true, request, &response));
  POLLEN_RETURN_IF_ERROR(AccumulateGradients(response, adapters, gradients));
  POLLEN_ASSIGN_OR_RETURN(
      gradients->grad_inputs,
      TensorFromProto(response.grad_inputs(),
                      absl::StrCat("grad_inputs of ",
                                   DescribeHop(hop_input.hop))));
  gradients->grad_inputs = gradients->grad_inputs.to(at::kFloat);
  return absl::OkStatus();
}

absl::StatusOr<RemoteBlocks::Gradients> RemoteBlocks::BackwardPass(
    const std::vector<HopInput>& hop_inputs, const AdapterSet& adapters,
    const at::Tensor& grad_outputs) {
  Gradients gradients;
  for (const at::Tensor& parameter : adapters.Parameters()) {
    gradients.grad_parameters.push_back(at::zeros_like(parameter.detach()));
  }
  gradients.grad_inputs = grad_outputs.detach().to(at::kCPU, at::kFloat);

  int failures = 0;
  for (auto it = hop_inputs.rbegin(); it != hop_inputs.rend(); ++it) {
    // The node that ran this hop forward may be gone: its blocks then go to
    // a new route, whose hop inputs are recomputed with Forward first.
    std::vector<HopInput> attempt_hops = {*it};
    const at::Tensor grad_after = gradients.grad_inputs;
    while (true) {
      Gradients attempt = gradients;
      attempt.grad_parameters.clear();
      for (const at::Tensor& grad : gradients.grad_parameters) {
        attempt.grad_parameters.push_back(grad.clone());
      }
      attempt.grad_inputs = grad_after;
      absl::Status status = absl::OkStatus();
      for (auto sub = attempt_hops.rbegin();
           sub != attempt_hops.rend() && status.ok(); ++sub) {
        status = BackwardHop(*sub, adapters, attempt.grad_inputs, &attempt);
        if (!status.ok() && IsFailoverError(status)) {
          swarm_.ReportFailure(sub->hop.server.node_id);
        }
      }
      if (status.ok()) {
        gradients = std::move(attempt);
        break;
      }
      if (!IsFailoverError(status) || ++failures > options_.max_failovers) {
        return status;
      }
      POLLEN_LOG_WARN("Backward of blocks {}:{} failed, rerouting: {}",
                      it->hop.start, it->hop.end, status.ToString());
      ++failovers_;
      attempt_hops.clear();
      POLLEN_RETURN_IF_ERROR(ForwardPass(it->input, adapters, it->hop.start,
                                         it->hop.end, &attempt_hops)
                                 .status());
    }
  }
  return gradients;
}

}  // namespace pollen::client
