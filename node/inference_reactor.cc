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
#include "node/session_steps_reactor.h"
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
                                  v1::InferenceStep* step,
                                  std::vector<StepTask>* tasks) {
  absl::MutexLock lock(&mu_);
  if (reactor_ == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "the stream of session '", step->session_id(), "' has ended"));
  }
  // The reserved step keeps the stream from finishing, so the reactor
  // lives until the task ends.
  absl::StatusOr<at::Tensor> hidden;
  {
    absl::MutexLock reactor_lock(&reactor_->mu_);
    hidden = reactor_->ReservePush(session, step);
  }
  if (!hidden.ok()) return hidden.status();
  POLLEN_LOG_DEBUG("session {}: pushed step at position {}",
                   session->request.session_id,
                   reactor_->pushed_step_.position());
  tasks->push_back(reactor_->MakeTask(reactor_->pushed_step_,
                                      InferenceReactor::StepSource::kPush,
                                      session, *std::move(hidden)));
  return absl::OkStatus();
}

void StepMailbox::ReturnPush(std::unique_ptr<v1::PushedStep> pushed,
                             const absl::Status& reason) {
  InferenceReactor* reactor = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (reactor_ != nullptr) {
      absl::MutexLock reactor_lock(&reactor_->mu_);
      if (reactor_->ReserveReturnedPush(*pushed)) reactor = reactor_;
    }
  }
  if (reactor == nullptr) {
    POLLEN_LOG_WARN(
        "session {}: dropped the output of position {}, which came back "
        "from the next node ({}): the session has moved on or ended",
        pushed->from_session_id(), pushed->step().position(),
        reason.ToString());
    return;
  }

  // The trail ends with this node's output, after the earlier nodes' ones.
  InferenceReactor::Reply reply;
  v1::InferenceStep* step = pushed->mutable_step();
  reply.encoded.emplace();
  reply.encoded->Swap(
      step->mutable_trail(step->trail_size() - 1)->mutable_hidden_states());
  step->mutable_trail()->RemoveLast();
  reply.trail.Swap(step->mutable_trail());
  reply.position = static_cast<uint32_t>(step->position() +
                                         reply.encoded->shape(1));
  POLLEN_LOG_INFO("session {}: replying to the client for position {}, "
                  "since the push failed: {}",
                  pushed->from_session_id(), step->position(),
                  reason.ToString());
  reactor->EndStep(absl::OkStatus(), std::move(reply));
}

void StepMailbox::Detach() {
  absl::MutexLock lock(&mu_);
  reactor_ = nullptr;
}

absl::Status DeliverStep(ServiceContext* context, StepOrigin origin,
                         v1::InferenceStep* step, std::vector<StepTask>* tasks) {
  if (origin == StepOrigin::kNode &&
      (step->trail().empty() || step->has_hidden_states())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a pushed step carries its input as the last trail entry and no "
        "hidden_states; got ", step->trail_size(), " trail entries and ",
        step->has_hidden_states() ? "" : "no ", "hidden_states"));
  }
  if (origin == StepOrigin::kClient && !step->trail().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a step from a client must have no trail, got ", step->trail_size(),
        " entries"));
  }
  if (origin == StepOrigin::kClient && !step->has_hidden_states()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the step for session '",
        step->session_id().substr(0, kMaxSessionIdLength),
        "' has no hidden_states"));
  }
  if (step->session_id().empty() ||
      step->session_id().size() > static_cast<size_t>(kMaxSessionIdLength)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step.session_id must have 1 to ", kMaxSessionIdLength,
        " characters, got ", step->session_id().size()));
  }
  POLLEN_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                          context->sessions->Find(step->session_id()));
  if (session->request.mailbox == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session '", step->session_id(), "' does not take pushed steps"));
  }
  return session->request.mailbox->Deliver(session, step, tasks);
}

void ReturnPushedStep(ServiceContext* context,
                      std::unique_ptr<v1::PushedStep> pushed,
                      const absl::Status& reason) {
  absl::StatusOr<std::shared_ptr<Session>> session =
      context->sessions->Find(pushed->from_session_id());
  if (!session.ok() || (*session)->request.mailbox == nullptr) {
    POLLEN_LOG_WARN("session {} is gone; dropped its returned push ({})",
                    pushed->from_session_id(), reason.ToString());
    return;
  }
  (*session)->request.mailbox->ReturnPush(std::move(pushed), reason);
}

InferenceReactor::InferenceReactor(ServiceContext* context,
                                   std::unique_ptr<Call> call)
    : ServerStreamReactor(std::move(call)),
      context_(context),
      peer_(peer()),
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
          request_.step().trail().empty()
              ? CheckStep(request_.step(), session_.get())
              : absl::InvalidArgumentError(absl::StrCat(
                    "a step from the client must have no trail, got ",
                    request_.step().trail_size(), " entries"));
      if (!hidden.ok()) {
        EndStep(hidden.status(), Reply{});
        return;
      }
      context_->sessions->SubmitStep(MakeTask(request_.step(),
                                              StepSource::kStream, session_,
                                              *std::move(hidden)));
      return;
    }
    default:
      FinishOnce(absl::InvalidArgumentError(
          "request has neither 'open' nor 'step' set"));
  }
}

absl::StatusOr<at::Tensor> InferenceReactor::ReservePush(
    const std::shared_ptr<Session>& session, v1::InferenceStep* step) {
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
    if (session->position != static_cast<int64_t>(step->position())) {
      return absl::AbortedError(absl::StrCat(
          "pushed step is for position ", step->position(), ", but session '",
          session_id, "' holds ", session->position, " tokens"));
    }
  }
  // Swapped, not copied, and swapped back when the step is invalid.
  pushed_step_.Swap(step);
  absl::StatusOr<at::Tensor> hidden = CheckStep(pushed_step_, session.get());
  if (!hidden.ok()) {
    pushed_step_.Swap(step);
    return hidden.status();
  }
  running_ = StepSource::kPush;
  return hidden;
}

bool InferenceReactor::ReserveReturnedPush(const v1::PushedStep& pushed) {
  const v1::InferenceStep& step = pushed.step();
  if (finished_ || finish_status_.has_value() ||
      running_ != StepSource::kNone || session_ == nullptr ||
      step.trail().empty() ||
      step.trail(step.trail_size() - 1).hidden_states().shape_size() < 2) {
    return false;
  }
  const int64_t end =
      step.position() +
      step.trail(step.trail_size() - 1).hidden_states().shape(1);
  {
    absl::MutexLock session_lock(&session_->mu);
    if (session_->closed || session_->position != end) return false;
  }
  running_ = StepSource::kPush;
  return true;
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
  if (step.push_to_size() + step.trail_size() > kMaxRouteHops) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push_to and trail name ", step.push_to_size() + step.trail_size(),
        " hops; a route has at most ", kMaxRouteHops));
  }
  for (const v1::PushTarget& target : step.push_to()) {
    POLLEN_RETURN_IF_ERROR(ValidatePushTarget(target, kMaxSessionIdLength));
  }

  // The tensor shares the bytes of the step, which stays unchanged until
  // the step ends. A pushed step's input is the previous node's output.
  const bool pushed = !step.trail().empty();
  POLLEN_ASSIGN_OR_RETURN(
      at::Tensor hidden,
      TensorViewFromProto(
          pushed ? step.trail(step.trail_size() - 1).hidden_states()
                 : step.hidden_states(),
          pushed ? "trail[-1].hidden_states" : "hidden_states"));
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

StepTask InferenceReactor::MakeTask(const v1::InferenceStep& step,
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
  return task;
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
  // A pushed step's input is no longer needed, and its trail travels on.
  if (source == StepSource::kPush) reply.trail.Swap(pushed_step_.mutable_trail());
  if (step.push_to().empty()) {
    if (!step.reply_stream_id().empty()) {
      std::shared_ptr<ReplySink> sink =
          context_->reply_streams.Find(step.reply_stream_id());
      if (sink != nullptr) {
        ReplyThrough(source, step, std::move(sink), std::move(reply));
        return;
      }
      POLLEN_LOG_DEBUG("session {}: no SessionSteps stream '{}'; replying on "
                       "the session's stream",
                       session_->request.session_id, step.reply_stream_id());
    }
    EndStep(absl::OkStatus(), std::move(reply));
    return;
  }

  // Send the output on to the next hop, with the hops after it, as the
  // last entry of the trail.
  auto pushed = std::make_unique<v1::PushedStep>();
  pushed->set_from_session_id(session_->request.session_id);
  v1::InferenceStep* next = pushed->mutable_step();
  next->set_session_id(step.push_to(0).session_id());
  next->set_position(step.position());
  next->set_reply_stream_id(step.reply_stream_id());
  for (int i = 1; i < step.push_to_size(); ++i) {
    *next->add_push_to() = step.push_to(i);
  }
  next->mutable_trail()->Swap(&reply.trail);
  v1::HopOutput* own = next->add_trail();
  own->set_draining(Draining());
  const absl::Status encoded =
      CatchTorchErrors("encoding the output to push", [&] {
        return TensorToProto(reply.hidden, own->mutable_hidden_states(),
                             compression_);
      });
  if (!encoded.ok()) {
    EndStep(encoded, Reply{});
    return;
  }

  // The step ends first, so that a push that fails at once finds the
  // session idle and replies to the client. A stream step's next read starts
  // after the pushes of the pass: posting it makes gRPC send the client a
  // flow-control update, which should not delay them. Without a reserved
  // read the stream may finish and `this` be deleted once the step has
  // ended.
  ServiceContext* context = context_;
  const std::string address = step.push_to(0).address();
  const int next_block = session_->request.to;
  bool finishing = false;
  absl::Status finish;
  if (!EndStepUnanswered(source, &finishing, &finish)) {
    if (finishing) SendFinish(finish);
    context->pusher.Push(address, next_block, std::move(pushed));
    return;
  }
  context->pusher.Push(address, next_block, std::move(pushed));
  StepPusher::Batch::RunAfterPushes([this] { StartReservedRead(); });
}

void InferenceReactor::ReplyThrough(StepSource source,
                                    const v1::InferenceStep& step,
                                    std::shared_ptr<ReplySink> sink,
                                    Reply reply) {
  v1::SessionReply session_reply;
  session_reply.set_session_id(session_->request.session_id);
  const absl::Status filled =
      FillResponse(std::move(reply), session_reply.mutable_response());
  if (!filled.ok()) {
    EndStep(filled, Reply{});
    return;
  }
  const std::string stream_id = step.reply_stream_id();

  // As after a push: once the step has ended, and without a reserved read,
  // the stream may finish and `this` be deleted.
  bool finishing = false;
  absl::Status finish;
  const bool reserved = EndStepUnanswered(source, &finishing, &finish);
  if (finishing) SendFinish(finish);
  const std::string session_id = session_reply.session_id();
  if (!sink->Send(std::move(session_reply))) {
    POLLEN_LOG_WARN("session {}: SessionSteps stream '{}' ended before the "
                    "reply; the client gets none",
                    session_id, stream_id);
  }
  if (reserved) StepPusher::Batch::RunAfterPushes([this] { StartReservedRead(); });
}

void InferenceReactor::StartReservedRead() {
  StartRead(&request_);
  bool finishing = false;
  absl::Status finish;
  {
    absl::MutexLock lock(&mu_);
    read_reserved_ = false;
    finishing = TakeFinish(&finish);
  }
  if (finishing) SendFinish(finish);
}

void InferenceReactor::EndStep(const absl::Status& status, Reply reply) {
  ReplyOrFinish(status, std::move(reply), /*end_step=*/true);
}

bool InferenceReactor::EndStepUnanswered(StepSource source,
                                         bool* finishing,
                                         absl::Status* finish) {
  absl::MutexLock lock(&mu_);
  running_ = StepSource::kNone;
  // A stream step used request_, and the next one may come now.
  if (source == StepSource::kStream && !reading_ && !writing_ &&
      !finished_ && !finish_status_.has_value()) {
    reading_ = true;
    read_reserved_ = true;
  }
  *finishing = !read_reserved_ && TakeFinish(finish);
  return read_reserved_;
}

void InferenceReactor::QueueReply(Reply reply) {
  ReplyOrFinish(absl::OkStatus(), std::move(reply), /*end_step=*/false);
}

void InferenceReactor::ReplyOrFinish(const absl::Status& status, Reply reply,
                                     bool end_step) {
  bool write = false;
  bool finishing = false;
  absl::Status finish;
  {
    absl::MutexLock lock(&mu_);
    if (end_step) running_ = StepSource::kNone;
    const bool ending = finished_ || finish_status_.has_value();
    if (!status.ok()) {
      if (!ending) finish_status_ = status;
    } else if (!ending) {
      if (writing_) {
        queued_reply_ = std::move(reply);
        return;
      }
      writing_ = true;
      write = true;
    }
    // A stream that is ending drops the reply, because no client reads it.
    if (!write) finishing = TakeFinish(&finish);
  }
  if (write) {
    WriteReply(std::move(reply));
  } else if (finishing) {
    SendFinish(finish);
  }
}

absl::Status InferenceReactor::FillResponse(Reply reply,
                                           v1::InferenceResponse* response) const {
  if (reply.encoded.has_value()) {
    response->mutable_hidden_states()->Swap(&*reply.encoded);
  } else if (reply.hidden.defined()) {
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors("encoding the step's output", [&] {
      return TensorToProto(reply.hidden, response->mutable_hidden_states(),
                           compression_);
    }));
  }
  response->set_position(reply.position);
  response->mutable_trail()->Swap(&reply.trail);
  // Tell the client to move the session when the node is leaving its span.
  response->set_draining(Draining());
  return absl::OkStatus();
}

void InferenceReactor::WriteReply(Reply reply) {
  // The output goes straight into the reused response message.
  response_.Clear();
  const absl::Status status = FillResponse(std::move(reply), &response_);
  if (!status.ok()) {
    bool finishing = false;
    absl::Status finish;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!finished_ && !finish_status_.has_value()) finish_status_ = status;
      finishing = TakeFinish(&finish);
    }
    if (finishing) SendFinish(finish);
    return;
  }
  StartWrite(&response_);
}

bool InferenceReactor::Draining() const {
  return context_->draining.load() || (session_ && session_->draining.load());
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
    WriteReply(*std::move(next));
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
    if (!TakeFinish(&status)) return false;
  }
  SendFinish(status);
  return true;
}

bool InferenceReactor::TakeFinish(absl::Status* status) {
  if (finished_ || !finish_status_.has_value() ||
      running_ != StepSource::kNone || writing_ || read_reserved_) {
    return false;
  }
  finished_ = true;
  *status = *finish_status_;
  return true;
}

void InferenceReactor::SendFinish(const absl::Status& status) {
  if (!status.ok()) {
    POLLEN_LOG_WARN("session {} from {}: {}",
                    session_ ? session_->request.session_id : "(not open)",
                    peer_, status.ToString());
  }
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
