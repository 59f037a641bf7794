// Moving a running node to other blocks of its model without failing the
// sessions it serves.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/checkpoint.h"
#include "common/dht_registry.h"
#include "node/announcer.h"
#include "node/block_service.h"
#include "node/quantized_linear.h"
#include "node/session_manager.h"
#include "pollen/v1/pollen.pb.h"

namespace pollen::node {

struct MoverOptions {
  // How often the node checks whether other blocks would serve the swarm
  // better; zero disables rebalancing (MoveBlocks still works).
  absl::Duration rebalance_period = absl::Minutes(5);
  // A rebalance moves only when the swarm's weakest block gets at least
  // this many times faster (scheduler::DecideMove's min_gain).
  double min_balance_gain = 1.25;
  // How long sessions on the old span may go on after a move before they
  // are closed and the old span freed.
  absl::Duration drain_timeout = absl::Seconds(30);
  // Seeds the rebalancing's jitter.
  uint64_t seed = 0;
};

// Objects a SpanMover works on. Everything pointed to must outlive the
// mover.
struct MoverTargets {
  std::shared_ptr<const Checkpoint> checkpoint;
  at::ScalarType dtype = at::kFloat;
  Quantization quantization = Quantization::kNone;
  at::Device device = at::kCPU;
  // This node's decode throughput, as announced.
  double throughput = 0;
  ServiceContext* service = nullptr;
  SessionManager* sessions = nullptr;
  Announcer* announcer = nullptr;
  DhtRegistry* registry = nullptr;
};

// Moves the node to other blocks while it serves: on request (MoveBlocks)
// and, every rebalance period, when scheduler::DecideMove finds a span that
// raises the swarm's weakest block enough.
//
// A move loads the new span while the old one keeps serving, and lets new
// sessions open on either span while it announces the new span, which
// withdraws the old blocks' keys. Then it stops opening sessions on the old
// span and marks that span's sessions draining. The old span is freed when
// its last session closes, or when the drain timeout closes the rest.
// NOTE: both spans are in memory during a move, which the span length
// chosen from free memory at start does not leave room for.
//
// Thread-safe. Moves run one at a time on the mover's own thread, which
// Start starts and Stop joins.
class SpanMover {
 public:
  using MoveDone = std::function<void(absl::StatusOr<v1::BlockRange>)>;

  SpanMover(MoverOptions options, MoverTargets targets);
  ~SpanMover();

  SpanMover(const SpanMover&) = delete;
  SpanMover& operator=(const SpanMover&) = delete;

  void Start();

  // Finishes the move in progress, fails queued ones with UNAVAILABLE and
  // joins the thread.
  void Stop();

  // Queues a move to blocks [start, end), which must lie within the model.
  // `done` runs once on the mover's thread with the blocks served
  // afterwards, or the error that left the node on its old span.
  void RequestMove(int start, int end, MoveDone done);

 private:
  struct MoveRequest {
    int start = 0;
    int end = 0;
    MoveDone done;
  };

  // A span the node moved away from, kept until its sessions are gone.
  struct DrainingSpan {
    std::weak_ptr<const BlockSpan> span;
    // Identity of the span; valid while `span` has not expired.
    const BlockSpan* key = nullptr;
    int start = 0;
    int end = 0;
    absl::Time deadline;
    bool timed_out = false;
  };

  void Run();

  absl::StatusOr<v1::BlockRange> Move(int start, int end,
                                      const std::string& reason);
  void Rebalance();

  // Frees draining spans whose sessions are gone and closes sessions on
  // spans past their drain deadline.
  void ReleaseDrainedSpans(absl::Time now);

  const MoverOptions options_;
  const MoverTargets targets_;
  std::thread thread_;

  // Used only on the mover's thread.
  std::mt19937_64 rng_;
  std::vector<DrainingSpan> draining_;

  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<MoveRequest> requests_ ABSL_GUARDED_BY(mu_);
};

}  // namespace pollen::node
