#include "node/inference_reactor.h"

#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"
#include "node/adapters.h"
#include "node/block_span.h"
#include "node/compute_queue.h"
#include "node/session_manager.h"

namespace pollen::node {
namespace {

// Checks everything but the blocks, which ServedSpans::SpanFor checks.
absl::Status ValidateOpen(const v1::InferenceOpen& open,
                          const ServiceContext& context) {
  const ModelConfig& config = context.config;

  if (open.model_id() != context.model_id) {
    return absl::NotFoundError(absl::StrCat(
        "model '", open.model_id(), "' is not served here; this node serves '",
        context.model_id, "'"));
  }
  if (open.session_id().empty() ||
      open.session_id().size() > kMaxSessionIdLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        "session_id must have 1 to ", kMaxSessionIdLength,
        " characters, got ", open.session_id().size()));
  }
  if (open.max_length() == 0 ||
      open.max_length() > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_length ", open.max_length(), " is outside 1..",
        config.max_position_embeddings, " (max_position_embeddings)"));
  }
  const int64_t batch = open.batch_size() == 0 ? 1 : open.batch_size();
  const int64_t max_batch = context.sessions->limits().max_batch_size;
  if (batch > max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch_size ", batch, " exceeds this node's limit of ", max_batch));
  }
  return absl::OkStatus();
}

}  // namespace

InferenceReactor::InferenceReactor(ServiceContext* context, std::string peer)
    : context_(context), peer_(std::move(peer)) {
  StartRead(&request_);
}

void InferenceReactor::OnReadDone(bool ok) {
  if (!ok) {
    // The client closed its side of the stream: the session is over.
    FinishOnce(absl::OkStatus());
    return;
  }

  response_.Clear();
  absl::Status status;
  switch (request_.kind_case()) {
    case v1::InferenceRequest::kOpen:
      status = HandleOpen(request_.open());
      break;
    case v1::InferenceRequest::kStep:
      // On success the step runs now or later, and StepDone replies. This
      // thread must not touch the reactor afterwards, because the reply
      // may already have led to the next read, or to OnDone.
      status = SubmitStep(request_.step());
      if (status.ok()) return;
      break;
    default:
      status = absl::InvalidArgumentError(
          "request has neither 'open' nor 'step' set");
  }
  Reply(status);
}

void InferenceReactor::StepDone(absl::StatusOr<at::Tensor> output) {
  absl::Status status = output.status();
  if (status.ok()) {
    // The output goes straight into the reused response message.
    status = CatchTorchErrors("encoding the step's output", [&] {
      return TensorToProto(*output, response_.mutable_hidden_states());
    });
    const v1::InferenceStep& step = request_.step();
    response_.set_position(
        static_cast<uint32_t>(step.position() + output->size(1)));
    POLLEN_LOG_DEBUG("session {}: {} tokens at position {}",
                     session_->request.session_id, output->size(1),
                     step.position());
  }
  Reply(status);
}

void InferenceReactor::Reply(const absl::Status& status) {
  if (!status.ok()) {
    POLLEN_LOG_WARN("session {} from {}: {}",
                    session_ ? session_->request.session_id : "(not open)",
                    peer_, status.ToString());
    FinishOnce(status);
    return;
  }
  // Tell the client to move the session when the node is leaving its span.
  if (context_->draining.load() || (session_ && session_->draining.load())) {
    response_.set_draining(true);
  }
  StartWrite(&response_);
}

void InferenceReactor::OnWriteDone(bool ok) {
  if (!ok) {
    FinishOnce(absl::CancelledError("client went away before the reply"));
    return;
  }
  StartRead(&request_);
}

void InferenceReactor::OnDone() {
  if (session_) {
    context_->sessions->Close(session_->request.session_id, "stream ended");
  }
  delete this;
}

void InferenceReactor::FinishOnce(const absl::Status& status) {
  if (finished_) return;
  finished_ = true;
  Finish(ToGrpcStatus(status));
}

absl::Status InferenceReactor::HandleOpen(const v1::InferenceOpen& open) {
  if (session_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session '", session_->request.session_id,
        "' is already open on this stream; send steps or close the stream"));
  }
  if (context_->draining.load()) {
    return absl::UnavailableError(
        "node is shutting down and accepts no new sessions; use another node");
  }
  POLLEN_RETURN_IF_ERROR(ValidateOpen(open, *context_));
  POLLEN_ASSIGN_OR_RETURN(
      std::shared_ptr<const BlockSpan> span,
      context_->spans.SpanFor(open.blocks().start(), open.blocks().end()));

  SessionRequest request;
  request.session_id = open.session_id();
  request.from = static_cast<int>(open.blocks().start());
  request.to = static_cast<int>(open.blocks().end());
  request.batch_size = open.batch_size() == 0 ? 1 : open.batch_size();
  request.max_length = open.max_length();

  // LoRA weights and deep prompts, checked once here and applied on every
  // step; a deep prompt is added to positions [0, prefix_len) only.
  std::map<int, BlockAdapter> adapters;
  POLLEN_ASSIGN_OR_RETURN(
      adapters,
      AdaptersFromProto(open.adapters(), context_->config, request.from,
                        request.to, request.batch_size, request.max_length));
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("moving the adapters of session '", request.session_id,
                   "' to ", span->device().str()),
      [&] {
        request.adapters = AdaptersTo(adapters, span->dtype(), span->device());
        return absl::OkStatus();
      }));
  POLLEN_ASSIGN_OR_RETURN(session_,
                          context_->sessions->Open(request, std::move(span)));

  response_.set_position(0);
  return absl::OkStatus();
}

absl::Status InferenceReactor::SubmitStep(const v1::InferenceStep& step) {
  if (!session_) {
    return absl::FailedPreconditionError(
        "the first message of an Inference stream must be 'open'");
  }
  const SessionRequest& request = session_->request;
  if (!step.session_id().empty() && step.session_id() != request.session_id) {
    return absl::NotFoundError(absl::StrCat(
        "session '", step.session_id(), "' is not open on this stream (it carries '",
        request.session_id, "')"));
  }

  // Check the tensor before queueing. It shares the bytes of request_,
  // which stays unchanged until the reply is written.
  POLLEN_ASSIGN_OR_RETURN(
      at::Tensor hidden,
      TensorViewFromProto(step.hidden_states(), "hidden_states"));
  const int64_t hidden_size = context_->config.hidden_size;
  if (hidden.dim() != 3 || hidden.size(0) != request.batch_size ||
      hidden.size(1) < 1 || hidden.size(2) != hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hidden_states shape [", absl::StrJoin(hidden.sizes(), ", "),
        "] does not match [batch ", request.batch_size, ", new_tokens >= 1, hidden ",
        hidden_size, "]"));
  }

  // The session manager checks the position against the session when the
  // step runs. Queued training work does not start meanwhile.
  StepTask task;
  task.session = session_;
  task.hidden = std::move(hidden);
  task.position = step.position();
  task.inference_scope =
      std::make_unique<ComputeQueue::InferenceScope>(&context_->compute);
  task.done = [this](absl::StatusOr<at::Tensor> output) {
    StepDone(std::move(output));
  };
  context_->sessions->SubmitStep(std::move(task));
  return absl::OkStatus();
}

}  // namespace pollen::node
