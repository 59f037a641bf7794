// Server-to-server push, sending side: passes a step's output straight to
// the session of the next node of a client's route, so that the hidden
// states skip the round trip through the client.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/channel_pool.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

// Maximum length of the host:port a client may name as a push target.
inline constexpr size_t kMaxPushAddressLength = 255;

// Checks a client's push target before any work: a host:port address of at
// most kMaxPushAddressLength characters and a session id of 1 to
// `max_session_id_length` characters.
absl::Status ValidatePushTarget(const v1::PushTarget& target,
                                size_t max_session_id_length);

// Gets back a pushed step that the next node never ran, with the reason:
// the stream to that node broke before the step was written, or the node
// rejected it.
using PushFailureHandler =
    std::function<void(std::unique_ptr<v1::PushedStep>, absl::Status)>;

// Keeps one PushSteps stream open to each node it pushes to, and writes
// the steps of all sessions bound there into it. A step that arrives while
// the stream writes the previous message waits, and goes out with the
// others that arrived meanwhile in one message. Within a PushBatch, steps
// wait for the batch's end, so the steps of one batched pass travel in one
// message per next node. Thread-safe.
//
// A step is sent once and never acknowledged, because the next node replies
// on its own session's stream. A step that was written but that the next node
// never ran (it crashed, or the connection broke after the write) is not
// reported here; the client sees that node's stream fail.
//
// NOTE: the addresses come from the client and are not checked against
// the DHT records, so a client can make this node dial any host:port, and
// the channel to each address stays pooled while the node runs.
class StepPusher {
  // One PushSteps call; defined in step_pusher.cc.
  class Stream;

 public:
  // Holds back the pushes this thread makes while it lives and sends them
  // when it ends, so that the outputs of one batched pass reach each next
  // node in one message, and run there in one pass. Nested batches send
  // with the outermost one.
  class Batch {
   public:
    Batch();
    ~Batch();
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;

   private:
    friend class StepPusher;
    struct Held {
      StepPusher* pusher;
      Stream* stream;
    };
    Batch* const outer_;
    std::vector<Held> held_;
  };

  // `on_failure` runs on a gRPC thread or on the thread that calls Push,
  // with no lock of this class held.
  explicit StepPusher(PushFailureHandler on_failure);
  // Calls Shutdown.
  ~StepPusher();

  StepPusher(const StepPusher&) = delete;
  StepPusher& operator=(const StepPusher&) = delete;

  // Queues `pushed` for the node at `address` and returns without waiting
  // for the network.
  void Push(const std::string& address, std::unique_ptr<v1::PushedStep> pushed);

  // Cancels every stream and waits up to `timeout` for gRPC to end them.
  // Queued steps go to the failure handler, and so does every later push.
  void Shutdown(absl::Duration timeout = absl::Seconds(2));

 private:
  // Takes a broken stream out of the map, so the next push opens another.
  void Forget(Stream* stream);

  // Ends a Push's or Shutdown's use of `stream`, and deletes it when gRPC
  // is done with it and no other call uses it.
  void Unpin(Stream* stream);

  // Called by a stream once gRPC has finished with it.
  void StreamDone(Stream* stream);

  const PushFailureHandler on_failure_;
  ChannelPool channels_;

  absl::Mutex mu_;
  // Open streams by address. A stream that broke leaves the map at once,
  // and lives on until gRPC is done with it.
  std::map<std::string, Stream*> streams_ ABSL_GUARDED_BY(mu_);
  // Streams not yet done, in or out of the map.
  int live_streams_ ABSL_GUARDED_BY(mu_) = 0;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace pollen::node
