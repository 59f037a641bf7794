#include "node/session_steps_reactor.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/block_service.h"
#include "node/inference_reactor.h"
#include "node/session_manager.h"
#include "node/step_pusher.h"

namespace pollen::node {

absl::Status ReplyStreams::Add(const std::string& stream_id,
                               std::shared_ptr<ReplySink> sink) {
  absl::MutexLock lock(&mu_);
  if (!sinks_.emplace(stream_id, std::move(sink)).second) {
    return absl::AlreadyExistsError(absl::StrCat(
        "a SessionSteps stream with id '", stream_id,
        "' is open on this node already; pick another id"));
  }
  return absl::OkStatus();
}

void ReplyStreams::Remove(const std::string& stream_id, const ReplySink* sink) {
  absl::MutexLock lock(&mu_);
  auto it = sinks_.find(stream_id);
  if (it != sinks_.end() && it->second.get() == sink) sinks_.erase(it);
}

std::shared_ptr<ReplySink> ReplyStreams::Find(const std::string& stream_id) const {
  absl::MutexLock lock(&mu_);
  auto it = sinks_.find(stream_id);
  return it == sinks_.end() ? nullptr : it->second;
}

// The stream's writing side, shared with ReplyStreams and with the passes
// that reply, so that a late reply never reaches a deleted reactor. It
// calls the reactor's StartWrite and Finish under its lock, and OnDone
// detaches it before the reactor goes.
class SessionStepsReactor::Outbox final
    : public ReplySink,
      public std::enable_shared_from_this<Outbox> {
 public:
  explicit Outbox(SessionStepsReactor* reactor) : reactor_(reactor) {}

  bool Send(v1::SessionReply reply) override {
    bool schedule = false;
    {
      absl::MutexLock lock(&mu_);
      if (reactor_ == nullptr || closing_) return false;
      *queued_.add_replies() = std::move(reply);
      schedule = !flush_scheduled_;
      flush_scheduled_ = true;
    }
    if (schedule) {
      StepPusher::Batch::RunAfterPushes(
          [self = shared_from_this()] { self->Flush(); });
    }
    return true;
  }

  void WriteDone(bool ok) {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      // The client is gone; its read side fails too, which closes us.
      broken_ = true;
      queued_.Clear();
    }
    if (!StartWriteLocked()) FinishIfDueLocked();
  }

  // Takes no more replies, drops the queued ones, and finishes the stream
  // with `status` once no write is in flight. Only the first status counts.
  void Close(const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    if (!closing_) finish_status_ = status;
    closing_ = true;
    queued_.Clear();
    FinishIfDueLocked();
  }

  void Detach() {
    absl::MutexLock lock(&mu_);
    reactor_ = nullptr;
  }

 private:
  void Flush() {
    absl::MutexLock lock(&mu_);
    flush_scheduled_ = false;
    StartWriteLocked();
  }

  // Writes the queued replies in one message unless a write is in flight.
  bool StartWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reactor_ == nullptr || writing_ || broken_ || closing_ ||
        queued_.replies().empty()) {
      return false;
    }
    writing_message_.Clear();
    writing_message_.Swap(&queued_);
    writing_ = true;
    reactor_->StartWrite(&writing_message_);
    return true;
  }

  void FinishIfDueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reactor_ == nullptr || !closing_ || writing_ || finished_) return;
    finished_ = true;
    if (!finish_status_.ok()) {
      POLLEN_LOG_WARN("SessionSteps stream '{}' from {}: {}",
                      reactor_->stream_id_, reactor_->peer_,
                      finish_status_.ToString());
    }
    reactor_->Finish(ToGrpcStatus(finish_status_));
  }

  absl::Mutex mu_;
  SessionStepsReactor* reactor_ ABSL_GUARDED_BY(mu_);
  v1::SessionStepsResponse queued_ ABSL_GUARDED_BY(mu_);
  // The message being written, unchanged until its write completes.
  v1::SessionStepsResponse writing_message_ ABSL_GUARDED_BY(mu_);
  bool flush_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status finish_status_ ABSL_GUARDED_BY(mu_);
};

SessionStepsReactor::SessionStepsReactor(ServiceContext* context,
                                         std::unique_ptr<Call> call)
    : ServerStreamReactor(std::move(call)),
      context_(context),
      peer_(peer()),
      outbox_(std::make_shared<Outbox>(this)) {
  StartRead(&request_);
}

void SessionStepsReactor::OnReadDone(bool ok) {
  if (!ok) {
    // The client half-closed the stream or went away.
    outbox_->Close(absl::OkStatus());
    return;
  }
  if (!opened_) {
    const absl::Status opened = HandleOpen(request_);
    if (!opened.ok()) {
      outbox_->Close(opened);
      return;
    }
    opened_ = true;
  } else if (request_.has_open()) {
    outbox_->Close(absl::InvalidArgumentError(
        "only the first SessionSteps message may carry 'open'"));
    return;
  }
  if (request_.steps_size() > kMaxStepsPerMessage) {
    outbox_->Close(absl::InvalidArgumentError(absl::StrCat(
        "a SessionSteps message carries ", request_.steps_size(),
        " steps; the limit is ", kMaxStepsPerMessage)));
    return;
  }

  // The steps move into their sessions, so the next read can reuse the
  // message at once.
  v1::SessionStepsRequest request;
  request.Swap(&request_);
  HandleSteps(&request);
  StartRead(&request_);
}

void SessionStepsReactor::OnWriteDone(bool ok) { outbox_->WriteDone(ok); }

void SessionStepsReactor::OnDone() {
  outbox_->Detach();
  if (!stream_id_.empty()) {
    context_->reply_streams.Remove(stream_id_, outbox_.get());
    POLLEN_LOG_DEBUG("SessionSteps stream '{}' from {} ended", stream_id_,
                     peer_);
  }
  delete this;
}

absl::Status SessionStepsReactor::HandleOpen(
    const v1::SessionStepsRequest& request) {
  if (!request.has_open()) {
    return absl::InvalidArgumentError(
        "the first SessionSteps message must carry 'open'");
  }
  const std::string& stream_id = request.open().stream_id();
  if (stream_id.empty() ||
      stream_id.size() > static_cast<size_t>(kMaxSessionIdLength)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stream_id must have 1 to ", kMaxSessionIdLength, " characters, got ",
        stream_id.size()));
  }
  POLLEN_RETURN_IF_ERROR(context_->reply_streams.Add(stream_id, outbox_));
  stream_id_ = stream_id;
  POLLEN_LOG_DEBUG("SessionSteps stream '{}' from {} opened", stream_id_, peer_);
  return absl::OkStatus();
}

void SessionStepsReactor::HandleSteps(v1::SessionStepsRequest* request) {
  // Error replies, and the replies of a pass that runs on this thread,
  // leave together when this batch ends.
  StepPusher::Batch batch;
  std::vector<StepTask> tasks;
  for (v1::InferenceStep& step : *request->mutable_steps()) {
    const absl::Status status =
        DeliverStep(context_, StepOrigin::kClient, &step, &tasks);
    if (status.ok()) continue;

    POLLEN_LOG_WARN("SessionSteps stream '{}' from {}: rejected a step for "
                    "session {}: {}",
                    stream_id_, peer_,
                    step.session_id().substr(0, kMaxSessionIdLength),
                    status.ToString());
    v1::SessionReply reply;
    reply.set_session_id(step.session_id().substr(0, kMaxSessionIdLength));
    reply.set_code(static_cast<int>(status.code()));
    reply.set_message(std::string(status.message()));
    outbox_->Send(std::move(reply));
  }
  if (!tasks.empty()) context_->sessions->SubmitSteps(std::move(tasks));
}

}  // namespace pollen::node
