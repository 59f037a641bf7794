// Server side of one Inference stream: one session from open to close,
// including the steps that the previous node of the route pushes into it.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "google/protobuf/repeated_ptr_field.h"
#include "node/block_service.h"
#include "node/call_loop.h"
#include "node/session_steps_reactor.h"
#include "node/step_batcher.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

struct Session;
class InferenceReactor;

// Limits on a single request, checked before any work is done.
inline constexpr int kMaxSessionIdLength = 128;
// Most hops a step's push_to and trail may name together.
inline constexpr int kMaxRouteHops = 256;

// Hands steps pushed by another node to the reactor of their session, for
// as long as that reactor lives. Shared by the reactor and its Session, so
// that a push that finds the session never reaches a deleted reactor.
// Thread-safe.
class StepMailbox {
 public:
  explicit StepMailbox(InferenceReactor* reactor) : reactor_(reactor) {}

  // Takes the pushed `step` into the session, as if it had come on the
  // stream, and appends the task that runs it to `tasks`. The step's
  // fields move into the reactor. Returns the reason it was rejected, with
  // `step` untouched: UNAVAILABLE after the stream ended, otherwise as
  // InferenceReactor::ReservePush.
  absl::Status Deliver(const std::shared_ptr<Session>& session,
                       v1::InferenceStep* step, std::vector<StepTask>* tasks);

  // Replies to the client with the output of a step that this session
  // could not push: `pushed` came back, and its trail ends with this node's
  // output. Dropped, with a log, when the session has moved past that
  // step or its stream ended.
  void ReturnPush(std::unique_ptr<v1::PushedStep> pushed,
                  const absl::Status& reason);

  // Called by the reactor before it deletes itself.
  void Detach();

 private:
  absl::Mutex mu_;
  InferenceReactor* reactor_ ABSL_GUARDED_BY(mu_);
};

// Sender of a step that does not come on its session's own stream.
enum class StepOrigin {
  // The previous node of the route, over PushSteps: the input is the last
  // trail entry, and hidden_states is unset.
  kNode,
  // The client, over SessionSteps: the input is hidden_states, and the
  // trail is empty.
  kClient,
};

// Hands `step`, which names its session, to that session's reactor as a
// pushed step and appends the task that runs it to `tasks`. Returns the
// reason it cannot run, with `step` untouched: INVALID_ARGUMENT for a bad
// session id or a step whose input is not where `origin` puts it,
// NOT_FOUND for a session that is not open here, and the others of
// StepMailbox::Deliver.
absl::Status DeliverStep(ServiceContext* context, StepOrigin origin,
                         v1::InferenceStep* step, std::vector<StepTask>* tasks);

// Reads requests one at a time and replies to each step once, whether it
// came on the stream or from a push. Steps run through the session
// manager's StepBatcher, which calls back from whichever thread ran the
// step. The call loop's thread runs the other callbacks.
//
// The route's last node replies to a step that names push targets, so here
// the step ends without a reply once its output is on its way. It gets one
// only when the push fails (StepMailbox::ReturnPush).
//
// A read is outstanding whenever no stream step is running, so a pushed
// step runs while the stream waits for the client, and its reply may be
// written while that read is pending. A stream step shares the bytes of
// the request message, so the next read starts only after it ends. The
// stream finishes only when no step runs and no write is pending; the
// reactor deletes itself in OnDone, after which the session is closed and
// its cache freed.
class InferenceReactor final
    : public ServerStreamReactor<v1::InferenceRequest, v1::InferenceResponse> {
 public:
  // `context` must outlive the reactor.
  InferenceReactor(ServiceContext* context, std::unique_ptr<Call> call);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;

 private:
  friend class StepMailbox;

  // Source of the running step.
  enum class StepSource { kNone, kStream, kPush };

  // A reply waiting for its write: the step's output or the open's reply.
  struct Reply {
    // The output, encoded when written. Undefined for the reply to open,
    // and when `encoded` contains the output already.
    at::Tensor hidden;
    std::optional<v1::Tensor> encoded;
    // The outputs of the route's earlier nodes, for a pushed step.
    google::protobuf::RepeatedPtrField<v1::HopOutput> trail;
    uint32_t position = 0;
  };

  // Fills response_ on success.
  absl::Status HandleOpen(const v1::InferenceOpen& open);

  // Takes a pushed step for this session when no step runs: moves it into
  // pushed_step_, marks a pushed step as running and checks it like a
  // stream step, and that its position is the session's. Returns its input
  // hidden states. FAILED_PRECONDITION while another step runs, ABORTED for
  // another position, UNAVAILABLE once finishing, INVALID_ARGUMENT for a
  // bad step; `step` is untouched then.
  absl::StatusOr<at::Tensor> ReservePush(const std::shared_ptr<Session>& session,
                           v1::InferenceStep* step)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Marks the returned `pushed` step as running, when this session is idle
  // and contains exactly the tokens up to the end of that step.
  bool ReserveReturnedPush(const v1::PushedStep& pushed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Checks `step` for `session` (null before the open) and returns its
  // input hidden states, which share the step's bytes.
  absl::StatusOr<at::Tensor> CheckStep(const v1::InferenceStep& step,
                                       const Session* session) const;

  // Builds the task that runs a checked step. StepDone runs later, on
  // whichever thread runs it, and `step` must stay unchanged until then.
  StepTask MakeTask(const v1::InferenceStep& step, StepSource source,
                    std::shared_ptr<Session> session, at::Tensor hidden);

  // Pushes the output when the step names push targets, or replies.
  void StepDone(StepSource source, const v1::InferenceStep& step,
                absl::StatusOr<at::Tensor> output);

  // Ends the running step: queues its reply, or finishes the stream with
  // `status`.
  void EndStep(const absl::Status& status, Reply reply);

  // Ends the running step with no reply: its output went to the next node.
  // Returns true when the caller must start the next read, which holds off
  // the finish until read_reserved_ is cleared. Otherwise sets `finishing`
  // when the caller must finish the stream with `finish` (SendFinish).
  bool EndStepUnanswered(StepSource source, bool* finishing,
                         absl::Status* finish);

  // Starts the read that EndStepUnanswered reserved, then sends a finish
  // that waited for it.
  void StartReservedRead();

  // Ends the running step and sends `reply` through `sink`, the
  // SessionSteps stream that the step names, instead of this stream.
  void ReplyThrough(StepSource source, const v1::InferenceStep& step,
                    std::shared_ptr<ReplySink> sink, Reply reply);

  // Writes `reply` now, or after the write in progress.
  void QueueReply(Reply reply);

  // Ends the running step when `end_step`, then writes or queues `reply`,
  // or records a failed `status` and finishes when nothing is in flight.
  // One critical section decides, because once the step has ended another
  // thread may finish the stream and delete `this`.
  void ReplyOrFinish(const absl::Status& status, Reply reply, bool end_step);

  // Fills `response` with `reply`: the output (encoded when it is not yet),
  // position, trail and draining flag.
  absl::Status FillResponse(Reply reply, v1::InferenceResponse* response) const;

  // Moves `reply` into response_ and writes it.
  void WriteReply(Reply reply);

  // Returns whether the client should move this session elsewhere.
  bool Draining() const;

  // Finishes the stream with `status` once no step runs and no write is
  // pending. Only the first status counts.
  void FinishOnce(const absl::Status& status);

  // Calls Finish when a finish is due and nothing is in flight. Returns
  // true when it did. Called without mu_, only while something keeps the
  // reactor alive (a callback in progress, or a step or write of this
  // thread).
  bool FinishIfIdle();

  // Marks the stream finished and returns true, with the status to send,
  // when a finish is due and nothing is in flight. The caller then calls
  // SendFinish, and no other thread can finish or delete the reactor
  // before that.
  bool TakeFinish(absl::Status* status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Logs a failed `status` and finishes the stream with it.
  void SendFinish(const absl::Status& status);

  ServiceContext* const context_;
  const std::string peer_;
  const std::shared_ptr<StepMailbox> mailbox_;

  // Written by the read callback, and read by the stream step it starts.
  v1::InferenceRequest request_;
  // Written only by the thread that holds the write (writing_).
  v1::InferenceResponse response_;
  // The running pushed step, owned by that step while it runs.
  v1::InferenceStep pushed_step_;
  // Set by the open and used by the stream's own callbacks; a pushed step
  // gets the session from the push instead.
  std::shared_ptr<Session> session_;

  // Encoding of the hidden states in every reply and push, from the open
  // message.
  v1::Compression compression_ = v1::COMPRESSION_NONE;

  absl::Mutex mu_;
  StepSource running_ ABSL_GUARDED_BY(mu_) = StepSource::kNone;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // Set between EndStepUnanswered and the read it reserved.
  bool read_reserved_ ABSL_GUARDED_BY(mu_) = false;
  // A reply that waits for the write in progress.
  std::optional<Reply> queued_reply_ ABSL_GUARDED_BY(mu_);
  // The status to finish with, once nothing is in flight.
  std::optional<absl::Status> finish_status_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace pollen::node
