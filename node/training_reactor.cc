#include "node/training_reactor.h"

#include <map>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/activation_compression.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"
#include "node/adapters.h"
#include "node/block_span.h"
#include "node/compute_queue.h"
#include "node/session_manager.h"

namespace pollen::node {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// A validated ForwardRequest, ready to run.
struct PreparedPass {
  std::shared_ptr<const BlockSpan> span;
  int from = 0;
  int to = 0;
  at::Tensor hidden;  // [batch, seq, hidden] as sent
  std::map<int, BlockAdapter> adapters;
};

absl::StatusOr<PreparedPass> Prepare(const v1::ForwardRequest& request,
                                     const ServiceContext& context) {
  const ModelConfig& config = context.config;
  if (request.model_id() != context.model_id) {
    return absl::NotFoundError(absl::StrCat(
        "model '", request.model_id(), "' is not served here; this node serves '",
        context.model_id, "'"));
  }
  if (context.draining.load()) {
    return absl::UnavailableError(
        "node is shutting down and accepts no training work; use another node");
  }
  POLLEN_RETURN_IF_ERROR(CheckCompression(request.compression()));

  PreparedPass pass;
  POLLEN_ASSIGN_OR_RETURN(
      pass.span,
      context.spans.SpanFor(request.blocks().start(), request.blocks().end()));
  pass.from = static_cast<int>(request.blocks().start());
  pass.to = static_cast<int>(request.blocks().end());

  // Hidden states [batch, seq, hidden].
  POLLEN_ASSIGN_OR_RETURN(
      pass.hidden, TensorFromProto(request.hidden_states(), "hidden_states"));
  const at::Tensor& hidden = pass.hidden;
  if (hidden.dim() != 3 || hidden.size(0) < 1 || hidden.size(1) < 1 ||
      hidden.size(2) != config.hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hidden_states shape ", ShapeString(hidden.sizes()),
        " does not match [batch >= 1, seq >= 1, hidden ", config.hidden_size,
        "]"));
  }
  if (hidden.size(1) > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hidden_states hold ", hidden.size(1),
        " positions, more than max_position_embeddings ",
        config.max_position_embeddings));
  }
  if (context.sessions != nullptr &&
      hidden.size(0) > context.sessions->limits().max_batch_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch ", hidden.size(0), " exceeds this node's limit of ",
                     context.sessions->limits().max_batch_size));
  }

  POLLEN_ASSIGN_OR_RETURN(
      pass.adapters,
      AdaptersFromProto(request.adapters(), config, pass.from, pass.to,
                        hidden.size(0), hidden.size(1)));
  return pass;
}

}  // namespace

absl::StatusOr<v1::ForwardResponse> RunForwardRequest(
    const v1::ForwardRequest& request, const ServiceContext& context) {
  POLLEN_ASSIGN_OR_RETURN(PreparedPass pass, Prepare(request, context));

  at::NoGradGuard no_grad;
  POLLEN_ASSIGN_OR_RETURN(
      at::Tensor outputs,
      pass.span->ForwardNoCache(pass.hidden, pass.from, pass.to, pass.adapters));

  v1::ForwardResponse response;
  POLLEN_RETURN_IF_ERROR(TensorToProto(
      outputs, response.mutable_hidden_states(), request.compression()));
  return response;
}

absl::StatusOr<v1::BackwardResponse> RunBackwardRequest(
    const v1::BackwardRequest& request, const ServiceContext& context) {
  POLLEN_ASSIGN_OR_RETURN(PreparedPass pass,
                          Prepare(request.forward(), context));

  // dLoss / d outputs, shaped like the outputs (which are shaped like the
  // inputs).
  POLLEN_ASSIGN_OR_RETURN(
      at::Tensor grad_outputs,
      TensorFromProto(request.grad_outputs(), "grad_outputs"));
  if (grad_outputs.sizes() != pass.hidden.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grad_outputs shape ", ShapeString(grad_outputs.sizes()),
        " does not match the outputs ", ShapeString(pass.hidden.sizes())));
  }

  POLLEN_ASSIGN_OR_RETURN(
      BackwardResult result,
      RunBackward(*pass.span, pass.from, pass.to, pass.hidden, pass.adapters,
                  grad_outputs));

  v1::BackwardResponse response;
  POLLEN_RETURN_IF_ERROR(
      TensorToProto(result.grad_inputs, response.mutable_grad_inputs(),
                    request.forward().compression()));
  POLLEN_RETURN_IF_ERROR(AdaptersToProto(result.grad_adapters,
                                         response.mutable_grad_adapters()));
  return response;
}

TrainingReactor::TrainingReactor(ServiceContext* context, Kind kind,
                                 std::unique_ptr<Call> call)
    : ServerStreamReactor(std::move(call)),
      context_(context),
      kind_(kind),
      peer_(peer()) {
  StartRead(&chunk_);
}

void TrainingReactor::OnReadDone(bool ok) {
  if (!ok) {
    // The client closed its side before the chunk marked last.
    const absl::Status status = reassembler_.Take().status();
    POLLEN_LOG_WARN("{} from {}: {}", name(), peer_, status.ToString());
    Finish(ToGrpcStatus(status));
    return;
  }
  absl::Status status = reassembler_.Add(chunk_);
  if (!status.ok()) {
    POLLEN_LOG_WARN("{} from {}: {}", name(), peer_, status.ToString());
    Finish(ToGrpcStatus(status));
    return;
  }
  if (!reassembler_.complete()) {
    StartRead(&chunk_);
    return;
  }

  // The whole request is here: queue the pass behind inference.
  status = context_->compute.Submit(
      [this](bool cancelled) { Compute(cancelled); });
  if (!status.ok()) {
    POLLEN_LOG_WARN("{} from {}: {}", name(), peer_, status.ToString());
    Finish(ToGrpcStatus(status));
  }
}

void TrainingReactor::Compute(bool cancelled) {
  if (cancelled) {
    Finish(ToGrpcStatus(absl::UnavailableError(
        "node shut down before running this request; use another node")));
    return;
  }
  absl::StatusOr<std::string> request = reassembler_.Take();
  absl::StatusOr<std::string> response =
      request.ok() ? Respond(*request) : request.status();
  if (!response.ok()) {
    POLLEN_LOG_WARN("{} from {}: {}", name(), peer_,
                    response.status().ToString());
    Finish(ToGrpcStatus(response.status()));
    return;
  }
  out_ = SplitIntoChunks(*response);
  next_out_ = 0;
  StartWrite(&out_[next_out_++]);
}

absl::StatusOr<std::string> TrainingReactor::Respond(
    const std::string& serialized) const {
  if (kind_ == Kind::kForward) {
    v1::ForwardRequest request;
    POLLEN_RETURN_IF_ERROR(ParseMessage(serialized, "ForwardRequest", &request));
    POLLEN_ASSIGN_OR_RETURN(v1::ForwardResponse response,
                            RunForwardRequest(request, *context_));
    return response.SerializeAsString();
  }
  v1::BackwardRequest request;
  POLLEN_RETURN_IF_ERROR(ParseMessage(serialized, "BackwardRequest", &request));
  POLLEN_ASSIGN_OR_RETURN(v1::BackwardResponse response,
                          RunBackwardRequest(request, *context_));
  return response.SerializeAsString();
}

void TrainingReactor::OnWriteDone(bool ok) {
  if (!ok) {
    Finish(ToGrpcStatus(
        absl::CancelledError("client went away before the whole reply")));
    return;
  }
  if (next_out_ < out_.size()) {
    StartWrite(&out_[next_out_++]);
    return;
  }
  Finish(grpc::Status::OK);
}

void TrainingReactor::OnDone() { delete this; }

}  // namespace pollen::node
