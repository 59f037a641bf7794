// The gRPC BlockService of a node: Inference, PushSteps and SessionSteps
// streams, Info, MoveBlocks and the Forward and Backward passes of training.
//
// This layer converts between protobuf and domain objects and between
// absl::Status and grpc::Status; the work happens in BlockSpan,
// SessionManager and SpanMover.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/model_config.h"
#include "node/call_loop.h"
#include "node/compute_queue.h"
#include "node/session_steps_reactor.h"
#include "node/step_pusher.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

class BlockSpan;
class SessionManager;

// The spans new sessions may open on. Normally one: the current span. While
// a move announces its new span, the previous span keeps accepting sessions
// too, so that clients still holding the old records get no error.
//
// Thread-safe.
class ServedSpans {
 public:
  // The span announced and reported by Info; null before the first Set.
  std::shared_ptr<const BlockSpan> current() const;

  // Makes `current` the span of new sessions. `previous`, when not null,
  // also accepts sessions for blocks that `current` lacks.
  void Set(std::shared_ptr<const BlockSpan> current,
           std::shared_ptr<const BlockSpan> previous = nullptr);

  // Returns the span a new session of blocks [from, to) opens on: the
  // current span when it covers them, otherwise the previous one. Returns
  // INVALID_ARGUMENT when the range is empty or ends past the model's last
  // block, and UNAVAILABLE when this node does not serve it or has no span
  // yet.
  absl::StatusOr<std::shared_ptr<const BlockSpan>> SpanFor(int64_t from,
                                                           int64_t to) const;

 private:
  mutable absl::Mutex mu_;
  std::shared_ptr<const BlockSpan> current_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const BlockSpan> previous_ ABSL_GUARDED_BY(mu_);
};

// Runs a move to blocks [start, end) and calls `done` once, from another
// thread, with the blocks served afterwards or the reason it failed.
using MoveFunction = std::function<void(
    int start, int end,
    std::function<void(absl::StatusOr<v1::BlockRange>)> done)>;

struct ServiceContext;

// Gives a pushed step that came back (see StepPusher) to the session that
// pushed it, which replies to its client with the output. Logs and drops it
// when that session is gone. Defined in inference_reactor.cc.
void ReturnPushedStep(ServiceContext* context,
                      std::unique_ptr<v1::PushedStep> pushed,
                      const absl::Status& reason);

// State the service reads from the node. The node sets every field before
// the server starts, except `draining`; everything referred to must outlive
// the service.
struct ServiceContext {
  std::string model_id;
  std::string node_id;
  // --public-name; empty when none was given.
  std::string public_name;
  // Architecture of the whole model; every span shares it.
  ModelConfig config;
  ServedSpans spans;
  SessionManager* sessions = nullptr;
  // Runs MoveBlocks requests; empty means the node does not move.
  MoveFunction move_blocks;
  // Set when the node is shutting down: new sessions and moves get
  // UNAVAILABLE, and every response to open sessions carries `draining`.
  std::atomic<bool> draining{false};
  // Runs Forward and Backward passes one at a time, after inference steps.
  ComputeQueue compute;
  // Sends step outputs to the next node when a client requests a push. A
  // step that comes back goes to the session that pushed it.
  // Open SessionSteps streams, through which steps may ask for replies.
  ReplyStreams reply_streams;
  StepPusher pusher{[this](std::unique_ptr<v1::PushedStep> pushed,
                           absl::Status reason) {
    ReturnPushedStep(this, std::move(pushed), reason);
  }};
};

// Serves every method through the asynchronous API, on a CallLoop's
// queue. Each stream gets a reactor that deletes itself when the call
// ends. Info replies on the loop's thread, and MoveBlocks from the mover.
class BlockServiceImpl final : public v1::BlockService::AsyncService {
 public:
  explicit BlockServiceImpl(ServiceContext* context) : context_(context) {}

  // Posts a request for the first call of each method on the queue of
  // `loop`, whose server this service is registered with. Call once, after
  // the server started.
  void StartAccepting(CallLoop* loop);

 private:
  using InfoCall = UnaryCall<v1::InfoRequest, v1::InfoResponse>;
  using MoveBlocksCall = UnaryCall<v1::MoveBlocksRequest, v1::MoveBlocksResponse>;

  void Info(std::unique_ptr<InfoCall> call);
  void MoveBlocks(std::unique_ptr<MoveBlocksCall> call);

  ServiceContext* const context_;
};

// Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000",
// "unix:/path") names a client on this machine: an IPv4 address in
// 127.0.0.0/8, ::1, an IPv4-mapped loopback address, or a Unix socket.
bool IsLoopbackPeer(const std::string& peer);

// Pollen's version string, as reported by Info and announced records.
const char* PollenVersion();

}  // namespace pollen::node
