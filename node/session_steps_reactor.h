// The SessionSteps stream: a client's channel for the steps of several of
// its sessions on one node, and for their replies, so that a pass over
// many sessions costs one message each way instead of one per session.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "node/call_loop.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

struct ServiceContext;

// Maximum number of steps in one SessionSteps message.
inline constexpr int kMaxStepsPerMessage = 1024;

// The destination of the replies to steps that name a SessionSteps stream.
// Thread-safe. It may outlive its stream, and rejects replies once the
// stream has ended.
class ReplySink {
 public:
  virtual ~ReplySink() = default;

  // Queues `reply` for the stream. Replies queued during one batched pass
  // (StepPusher::Batch) leave in one message when the pass ends. Returns
  // false, dropping the reply, once the stream has ended.
  virtual bool Send(v1::SessionReply reply) = 0;
};

// The open SessionSteps streams of a node by stream id. Thread-safe.
class ReplyStreams {
 public:
  // Returns ALREADY_EXISTS when a stream of that id is open.
  absl::Status Add(const std::string& stream_id,
                   std::shared_ptr<ReplySink> sink);
  // Removes `stream_id` when it still maps to `sink`.
  void Remove(const std::string& stream_id, const ReplySink* sink);
  // Null when no stream of that id is open.
  std::shared_ptr<ReplySink> Find(const std::string& stream_id) const;

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<ReplySink>> sinks_ ABSL_GUARDED_BY(mu_);
};

// Server side of one SessionSteps stream. The first message names the
// stream, and it is registered in ReplyStreams until it ends. Each step is
// handed to its session as a pushed step would be; a step that cannot run
// gets an error reply here at once. The reply of a step that names this
// stream comes from whichever thread ran the pass, through the sink.
//
// One write is in flight at a time; replies that arrive meanwhile go out
// together in the next message. The stream finishes when the client has
// half-closed it and no write is pending; replies after that are dropped.
// The reactor deletes itself in OnDone.
class SessionStepsReactor final
    : public ServerStreamReactor<v1::SessionStepsRequest,
                                 v1::SessionStepsResponse> {
 public:
  // `context` must outlive the reactor.
  SessionStepsReactor(ServiceContext* context, std::unique_ptr<Call> call);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;

 private:
  class Outbox;

  // Registers the stream named by the first message.
  absl::Status HandleOpen(const v1::SessionStepsRequest& request);

  // Hands each step of `request` to its session and submits the tasks;
  // queues an error reply for each step that cannot run.
  void HandleSteps(v1::SessionStepsRequest* request);

  ServiceContext* const context_;
  const std::string peer_;
  const std::shared_ptr<Outbox> outbox_;
  std::string stream_id_;  // set by the first message

  // Written by the read callback only.
  v1::SessionStepsRequest request_;
  bool opened_ = false;
};

}  // namespace pollen::node
