// Server-to-server push, sending side: passes a step's output straight to
// the session of the next node of a client's route, so that the hidden
// states skip the round trip through the client.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/channel_pool.h"
#include "node/call_loop.h"
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

// Returns OK when the node at `address` announced block `block` of this
// node's model, and the reason otherwise. May block, for a DHT lookup.
using PushTargetCheck =
    std::function<absl::Status(const std::string& address, int block)>;

// Keeps one PushSteps stream open to each node it pushes to, and writes
// the steps of all sessions bound there into it. A step that arrives while
// the stream writes the previous message waits, and goes out with the
// others that arrived meanwhile in one message. Within a PushBatch, steps
// wait for the batch's end, so the steps of one batched pass travel in one
// message per next node. Thread-safe.
//
// A step is sent once and never acknowledged, because the next node replies
// on its own session's stream. The pusher never learns of a step that was
// written but not run, because the next node crashed or the connection
// broke after the write. The client sees that node's stream fail instead.
//
// The addresses come from the client. With a target check set, a stream
// to a new address opens only after the check passed on the pusher's own
// thread, and its steps wait meanwhile. So a client cannot make this node
// send to a host:port that no node of the model announced. Each checked
// address keeps a pooled channel while the node runs.
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

    // Runs `work` on this thread after the outermost batch of this thread
    // has sent its pushes, or at once when no batch lives. For work that
    // sends something else, which should not delay the pushes.
    static void RunAfterPushes(std::function<void()> work);

   private:
    friend class StepPusher;
    struct HeldStream {
      StepPusher* pusher;
      Stream* stream;
    };
    Batch* const outer_;
    std::vector<HeldStream> held_;
    std::vector<std::function<void()>> after_pushes_;
  };

  // `on_failure` runs on the call loop's thread or on the thread that calls
  // Push, with no lock of this class held.
  explicit StepPusher(PushFailureHandler on_failure);
  // Calls Shutdown.
  ~StepPusher();

  StepPusher(const StepPusher&) = delete;
  StepPusher& operator=(const StepPusher&) = delete;

  // Makes streams to new addresses wait for `check`. Call before the first
  // Push.
  void SetTargetCheck(PushTargetCheck check);

  // Sets the loop that drives the streams. Until it is set, every push
  // fails with UNAVAILABLE.
  void SetCallLoop(CallLoop* loop);

  // Queues `pushed` for the node at `address`, whose session starts at
  // `block`, and returns without waiting for the network.
  void Push(const std::string& address, int block,
            std::unique_ptr<v1::PushedStep> pushed);

  // Cancels every stream and waits up to `timeout` for gRPC to end them.
  // Queued steps go to the failure handler, and so does every later push.
  void Shutdown(absl::Duration timeout = absl::Seconds(2));

 private:
  // Takes a broken stream out of the map, so the next push opens another.
  void Forget(Stream* stream);

  // Ends a Push's or Shutdown's use of `stream`, and deletes it when gRPC
  // is done with it and no other call uses it.
  void Unpin(Stream* stream);

  // Called by a stream once gRPC has finished with it, or by the checker
  // for a stream that never started.
  void StreamDone(Stream* stream);

  // Checks the addresses of new streams, one at a time, until Shutdown.
  void RunChecks();

  const PushFailureHandler on_failure_;
  PushTargetCheck check_;
  ChannelPool channels_;

  absl::Mutex mu_;
  CallLoop* loop_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Open streams by address. A stream that broke leaves the map at once,
  // and lives on until gRPC is done with it.
  std::map<std::string, Stream*> streams_ ABSL_GUARDED_BY(mu_);
  // Streams not yet done, in or out of the map.
  int live_streams_ ABSL_GUARDED_BY(mu_) = 0;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  // New streams waiting for the check, pinned, with the block to check.
  std::deque<std::pair<Stream*, int>> unchecked_ ABSL_GUARDED_BY(mu_);
  std::thread checker_;
};

}  // namespace pollen::node
