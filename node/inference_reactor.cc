#include "node/inference_reactor.h"

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
#include "node/step_pusher.h"

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
  POLLEN_RETURN_IF_ERROR(CheckCompression(open.compression()));
  return absl::OkStatus();
}

}  // namespace

absl::Status StepMailbox::Deliver(const std::shared_ptr<Session>& session,
                                  const v1::InferenceStep& step,
                                  const std::function<void()>& accepted) {
  InferenceReactor* reactor = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (reactor_ == nullptr) {
      return absl::UnavailableError(absl::StrCat(
          "the stream of session '", step.session_id(), "' has ended"));
    }
    POLLEN_RETURN_IF_ERROR(reactor_->ReservePush(session, step));
    reactor = reactor_;
  }
  // The reserved step keeps the stream from finishing, so the reactor
  // lives until the step ends. `step` may be gone after `accepted`.
  accepted();
  reactor->RunPushed(session);
  return absl::OkStatus();
}

void StepMailbox::Detach() {
  absl::MutexLock lock(&mu_);
  reactor_ = nullptr;
}

InferenceReactor::InferenceReactor(ServiceContext* context, std::string peer)
    : context_(context),
      peer_(std::move(peer)),
      mailbox_(std::make_shared<StepMailbox>(this)) {
  {
    absl::MutexLock lock(&mu_);
    reading_ = true;
  }
  StartRead(&request_);
}

void InferenceReactor::OnReadDone(bool ok) {
  {
    absl::MutexLock lock(&mu_);
    reading_ = false;
  }
  if (!ok) {
    // The client closed its side of the stream: the session is over.
    if (session_) context_->sessions->EndSteps(*session_);
    FinishOnce(absl::OkStatus());
    return;
  }

  switch (request_.kind_case()) {
    case v1::InferenceRequest::kOpen: {
      const absl::Status status = HandleOpen(request_.open());
      if (status.ok()) {
        QueueReply(Reply{});
      } else {
        FinishOnce(status);
      }
      return;
    }
    case v1::InferenceRequest::kStep: {
      bool busy = false;
      {
        absl::MutexLock lock(&mu_);
        busy = running_ != StepSource::kNone;
        if (!busy) running_ = StepSource::kStream;
      }
      if (busy) {
        FinishOnce(absl::FailedPreconditionError(absl::StrCat(
            "a step for position ", request_.step().position(),
            " arrived while a pushed step runs; send a step only after the "
            "previous reply, and none for a step the previous node pushed")));
        return;
      }
      // On success the step runs now or later, and StepDone replies.
      absl::StatusOr<at::Tensor> hidden =
          CheckStep(request_.step(), session_.get());
      if (!hidden.ok()) {
        EndStep(hidden.status(), Reply{});
        return;
      }
      SubmitStep(request_.step(), StepSource::kStream, session_,
                 *std::move(hidden));
      return;
    }
    default:
      FinishOnce(absl::InvalidArgumentError(
          "request has neither 'open' nor 'step' set"));
  }
}

absl::Status InferenceReactor::ReservePush(
    const std::shared_ptr<Session>& session, const v1::InferenceStep& step) {
  absl::MutexLock lock(&mu_);
  const std::string& session_id = session->request.session_id;
  if (finished_ || finish_status_.has_value()) {
    return absl::UnavailableError(
        absl::StrCat("session '", session_id, "' is closing"));
  }
  if (running_ != StepSource::kNone) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session '", session_id, "' is running another step; send this one ",
        "through the client"));
  }
  {
    absl::MutexLock session_lock(&session->mu);
    if (session->closed) {
      return absl::NotFoundError(absl::StrCat(
          "session '", session_id, "' was closed: ", session->closed_reason));
    }
    if (session->position != static_cast<int64_t>(step.position())) {
      return absl::AbortedError(absl::StrCat(
          "pushed step is for position ", step.position(), ", but session '",
          session_id, "' holds ", session->position, " tokens"));
    }
  }
  pushed_step_ = step;
  absl::StatusOr<at::Tensor> hidden = CheckStep(pushed_step_, session.get());
  if (!hidden.ok()) return hidden.status();
  pushed_hidden_ = *std::move(hidden);
  running_ = StepSource::kPush;
  return absl::OkStatus();
}

void InferenceReactor::RunPushed(std::shared_ptr<Session> session) {
  POLLEN_LOG_DEBUG("session {}: pushed step at position {}",
                   session->request.session_id, pushed_step_.position());
  SubmitStep(pushed_step_, StepSource::kPush, std::move(session),
             std::move(pushed_hidden_));
}

absl::StatusOr<at::Tensor> InferenceReactor::CheckStep(
    const v1::InferenceStep& step, const Session* session) const {
  if (session == nullptr) {
    return absl::FailedPreconditionError(
        "the first message of an Inference stream must be 'open'");
  }
  const SessionRequest& request = session->request;
  if (!step.session_id().empty() && step.session_id() != request.session_id) {
    return absl::NotFoundError(absl::StrCat(
        "session '", step.session_id(), "' is not open on this stream (it carries '",
        request.session_id, "')"));
  }
  for (const v1::PushTarget& target : step.push_to()) {
    POLLEN_RETURN_IF_ERROR(ValidatePushTarget(target, kMaxSessionIdLength));
  }

  // The tensor shares the bytes of the step, which stays unchanged until
  // the step ends.
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
  return hidden;
}

void InferenceReactor::SubmitStep(const v1::InferenceStep& step,
                                  StepSource source,
                                  std::shared_ptr<Session> session,
                                  at::Tensor hidden) {
  // The session manager checks the position against the session when the
  // step runs. Queued training work does not start meanwhile.
  StepTask task;
  task.session = std::move(session);
  task.hidden = std::move(hidden);
  task.position = step.position();
  task.inference_scope =
      std::make_unique<ComputeQueue::InferenceScope>(&context_->compute);
  task.done = [this, source, &step](absl::StatusOr<at::Tensor> output) {
    StepDone(source, step, std::move(output));
  };
  context_->sessions->SubmitStep(std::move(task));
}

void InferenceReactor::StepDone(StepSource source,
                                const v1::InferenceStep& step,
                                absl::StatusOr<at::Tensor> output) {
  if (!output.ok()) {
    EndStep(output.status(), Reply{});
    return;
  }
  Reply reply;
  reply.hidden = *std::move(output);
  reply.position =
      static_cast<uint32_t>(step.position() + reply.hidden.size(1));
  POLLEN_LOG_DEBUG("session {}: {} tokens at position {}{}", step.session_id(),
                   reply.hidden.size(1), step.position(),
                   source == StepSource::kPush ? " (pushed)" : "");
  if (step.push_to().empty()) {
    EndStep(absl::OkStatus(), std::move(reply));
    return;
  }

  // Send the output on to the next hop, with the hops after it. The reply
  // to the client waits for the push's result, so that it can say whether
  // the client must send the output itself.
  auto push = std::make_unique<v1::PushRequest>();
  v1::InferenceStep* next = push->mutable_step();
  next->set_session_id(step.push_to(0).session_id());
  next->set_position(step.position());
  for (int i = 1; i < step.push_to_size(); ++i) {
    *next->add_push_to() = step.push_to(i);
  }
  const absl::Status encoded =
      CatchTorchErrors("encoding the output to push", [&] {
        return TensorToProto(reply.hidden, next->mutable_hidden_states(),
                             compression_);
      });
  if (!encoded.ok()) {
    EndStep(encoded, Reply{});
    return;
  }
  const std::string address = step.push_to(0).address();
  const std::string from_session = step.session_id();
  context_->pusher.Push(
      address, std::move(push),
      [this, from_session, reply = std::move(reply)](absl::Status pushed) mutable {
        if (!pushed.ok()) {
          POLLEN_LOG_WARN("session {}: {}; the client sends the output itself",
                          from_session, pushed.ToString());
        }
        reply.pushed = pushed.ok();
        EndStep(absl::OkStatus(), std::move(reply));
      });
}

void InferenceReactor::EndStep(const absl::Status& status, Reply reply) {
  {
    absl::MutexLock lock(&mu_);
    running_ = StepSource::kNone;
  }
  if (!status.ok()) {
    FinishOnce(status);
    return;
  }
  QueueReply(std::move(reply));
}

void InferenceReactor::QueueReply(Reply reply) {
  bool write = false;
  {
    absl::MutexLock lock(&mu_);
    if (!finished_ && !finish_status_.has_value()) {
      if (writing_) {
        queued_reply_ = std::move(reply);
        return;
      }
      writing_ = true;
      write = true;
    }
  }
  // A stream that is ending drops the reply, because no client reads it.
  if (write) {
    WriteReply(reply);
  } else {
    FinishIfIdle();
  }
}

void InferenceReactor::WriteReply(const Reply& reply) {
  response_.Clear();
  absl::Status status;
  if (reply.hidden.defined()) {
    // The output goes straight into the reused response message.
    status = CatchTorchErrors("encoding the step's output", [&] {
      return TensorToProto(reply.hidden, response_.mutable_hidden_states(),
                           compression_);
    });
  }
  if (!status.ok()) {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
    }
    FinishOnce(status);
    return;
  }
  response_.set_position(reply.position);
  response_.set_pushed(reply.pushed);
  // Tell the client to move the session when the node is leaving its span.
  if (context_->draining.load() || (session_ && session_->draining.load())) {
    response_.set_draining(true);
  }
  StartWrite(&response_);
}

void InferenceReactor::OnWriteDone(bool ok) {
  std::optional<Reply> next;
  bool read = false;
  {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      if (!finish_status_.has_value()) {
        finish_status_ = absl::CancelledError("client went away before the reply");
      }
    } else if (finish_status_.has_value() || finished_) {
      // Finishing below.
    } else if (queued_reply_.has_value()) {
      next = std::move(queued_reply_);
      queued_reply_.reset();
      writing_ = true;
    } else if (!reading_ && running_ != StepSource::kStream) {
      // The stream step that used request_ is done: read the next request.
      reading_ = true;
      read = true;
    }
  }
  if (next.has_value()) {
    WriteReply(*next);
  } else if (read) {
    StartRead(&request_);
  } else {
    FinishIfIdle();
  }
}

void InferenceReactor::OnDone() {
  mailbox_->Detach();
  if (session_) {
    context_->sessions->Close(session_->request.session_id, "stream ended");
  }
  delete this;
}

void InferenceReactor::FinishOnce(const absl::Status& status) {
  {
    absl::MutexLock lock(&mu_);
    if (finished_ || finish_status_.has_value()) return;
    finish_status_ = status;
  }
  FinishIfIdle();
}

bool InferenceReactor::FinishIfIdle() {
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    if (finished_ || !finish_status_.has_value() ||
        running_ != StepSource::kNone || writing_) {
      return false;
    }
    finished_ = true;
    status = *finish_status_;
  }
  if (!status.ok()) {
    POLLEN_LOG_WARN("session {} from {}: {}",
                    session_ ? session_->request.session_id : "(not open)",
                    peer_, status.ToString());
  }
  Finish(ToGrpcStatus(status));
  return true;
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
  request.mailbox = mailbox_;

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
  // Set before the session is visible to pushes, whose replies use it.
  compression_ = open.compression();
  POLLEN_ASSIGN_OR_RETURN(session_,
                          context_->sessions->Open(request, std::move(span)));

  return absl::OkStatus();
}

}  // namespace pollen::node
