// Server side of one Inference stream: one session from open to close,
// including the steps that the previous node of the route pushes into it.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "node/block_service.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

struct Session;
class InferenceReactor;

// Limits on a single request, checked before any work is done.
inline constexpr int kMaxSessionIdLength = 128;

// Hands steps pushed by another node to the reactor of their session, for
// as long as that reactor lives. Shared by the reactor and its Session, so
// that a Push call that finds the session never reaches a deleted reactor.
// Thread-safe.
class StepMailbox {
 public:
  explicit StepMailbox(InferenceReactor* reactor) : reactor_(reactor) {}

  // Runs `step` in the session as if it had come on the stream: takes a
  // copy, calls `accepted` (which may free `step`), then queues the step,
  // which may run on this thread. Returns the reason it was rejected, before
  // `accepted`: UNAVAILABLE after the stream ended, otherwise as
  // InferenceReactor::ReservePush.
  absl::Status Deliver(const std::shared_ptr<Session>& session,
                       const v1::InferenceStep& step,
                       const std::function<void()>& accepted);

  // Called by the reactor before it deletes itself.
  void Detach();

 private:
  absl::Mutex mu_;
  InferenceReactor* reactor_ ABSL_GUARDED_BY(mu_);
};

// Reads requests one at a time and writes exactly one response per step,
// whether the step came on the stream or from a Push. Steps run through
// the session manager's StepBatcher, which calls back from whichever thread
// ran the step; gRPC runs the other callbacks on its own threads.
//
// A read is outstanding whenever no stream step is running, so a pushed
// step runs while the stream waits for the client, and its reply may be
// written while that read is pending. A stream step shares the bytes of
// the request message, so the next read starts only after its reply. The
// stream finishes only when no step runs and no write is pending; the
// reactor deletes itself in OnDone, after which the session is closed and
// its cache freed.
class InferenceReactor final
    : public grpc::ServerBidiReactor<v1::InferenceRequest,
                                     v1::InferenceResponse> {
 public:
  // `context` must outlive the reactor. `peer` names the client in logs.
  InferenceReactor(ServiceContext* context, std::string peer);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;

 private:
  friend class StepMailbox;

  // Source of the running step.
  enum class StepSource { kNone, kStream, kPush };

  // A reply waiting for its write: the step's output or the open's reply.
  struct Reply {
    at::Tensor hidden;  // undefined for the reply to open
    uint32_t position = 0;
    bool pushed = false;
  };

  // Fills response_ on success.
  absl::Status HandleOpen(const v1::InferenceOpen& open);

  // Takes a pushed step for this session when no step runs: copies it,
  // marks a pushed step as running and checks it like a stream step, and
  // that its position is the session's. FAILED_PRECONDITION while another
  // step runs, ABORTED for another position, UNAVAILABLE once finishing.
  absl::Status ReservePush(const std::shared_ptr<Session>& session,
                           const v1::InferenceStep& step);

  // Queues the step that ReservePush took.
  void RunPushed(std::shared_ptr<Session> session);

  // Checks `step` for `session` (null before the open) and returns its
  // hidden states, which share the step's bytes.
  absl::StatusOr<at::Tensor> CheckStep(const v1::InferenceStep& step,
                                       const Session* session) const;

  // Queues a checked step; StepDone runs later, on whichever thread runs
  // it. `step` must stay unchanged until then.
  void SubmitStep(const v1::InferenceStep& step, StepSource source,
                  std::shared_ptr<Session> session, at::Tensor hidden);

  // Pushes the output when the step names push targets, then replies.
  void StepDone(StepSource source, const v1::InferenceStep& step,
                absl::StatusOr<at::Tensor> output);

  // Ends the running step: queues its reply, or finishes the stream with
  // `status`.
  void EndStep(const absl::Status& status, Reply reply);

  // Writes `reply` now, or after the write in progress.
  void QueueReply(Reply reply);

  // Encodes `reply` into response_ and writes it.
  void WriteReply(const Reply& reply);

  // Finishes the stream with `status` once no step runs and no write is
  // pending. Only the first status counts.
  void FinishOnce(const absl::Status& status);

  // Calls Finish when a finish is due and nothing is in flight. Returns
  // true when it did. Called without mu_.
  bool FinishIfIdle();

  ServiceContext* const context_;
  const std::string peer_;
  const std::shared_ptr<StepMailbox> mailbox_;

  // Written by the read callback, and read by the stream step it starts.
  v1::InferenceRequest request_;
  // Written only by the thread that holds the write (writing_).
  v1::InferenceResponse response_;
  // The running pushed step and its hidden states; owned by that step
  // while it runs.
  v1::InferenceStep pushed_step_;
  at::Tensor pushed_hidden_;
  // Set by the open and used by the stream's own callbacks; a pushed step
  // gets the session from the Push call instead.
  std::shared_ptr<Session> session_;

  // Encoding of the hidden states in every reply and push, from the open
  // message.
  v1::Compression compression_ = v1::COMPRESSION_NONE;

  absl::Mutex mu_;
  StepSource running_ ABSL_GUARDED_BY(mu_) = StepSource::kNone;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // A reply that waits for the write in progress.
  std::optional<Reply> queued_reply_ ABSL_GUARDED_BY(mu_);
  // The status to finish with, once nothing is in flight.
  std::optional<absl::Status> finish_status_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace pollen::node
