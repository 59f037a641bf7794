// Server-to-server push, receiving side: the PushSteps stream through
// which the previous node of a route hands this node the steps of its
// sessions.
#pragma once

#include <deque>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "node/block_service.h"
#include "node/call_loop.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

// Reads the steps another node pushes and runs each in its session, which
// replies on its own stream. A step that cannot run goes back to the
// pushing node in a PushRejection with the reason. Steps that arrive in
// one message are queued together, so they can share a forward pass.
//
// The read callback runs the passes on the call loop's thread when no pass
// is running, as a stream step does, and reads the next message afterwards.
// Posting that read makes gRPC return flow-control credit to the pushing
// node, which then goes out after this node's own push. The stream
// finishes after the pushing node ends it and every write is done, and
// the reactor deletes itself in OnDone.
class PushReceiver final
    : public ServerStreamReactor<v1::PushRequest, v1::PushRejection> {
 public:
  // `context` must outlive the reactor.
  PushReceiver(ServiceContext* context, std::unique_ptr<Call> call);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;

 private:
  // Queues `pushed` to go back with `status`.
  void Reject(v1::PushedStep pushed, const absl::Status& status);

  // Finishes once the pushing node ended the stream and nothing is in
  // flight.
  void FinishIfIdle();

  ServiceContext* const context_;
  const std::string peer_;

  // Written by the read callback only.
  v1::PushRequest request_;

  absl::Mutex mu_;
  // The message being written, unchanged until its write completes.
  v1::PushRejection writing_message_;
  std::deque<v1::PushRejection> rejections_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool read_ended_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace pollen::node
