// Runs the inference steps of a node's sessions: steps that wait at the
// same time run as one batched forward pass (continuous batching), and
// long steps run in chunks (chunked prefill).
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "node/compute_queue.h"

namespace pollen::node {

struct Session;

// One step of one session, waiting to run.
struct StepTask {
  std::shared_ptr<Session> session;
  // [batch, new_tokens, hidden_size] in any float dtype, on the CPU or the
  // span's device. It may share memory with the request message; the
  // batcher reads it only until it calls `done`.
  at::Tensor hidden;
  // Position of the first new token, as the client sent it.
  int64_t position = 0;
  // Keeps queued training work from starting while the step waits or
  // runs; released after `done`. May be null.
  std::unique_ptr<ComputeQueue::InferenceScope> inference_scope;
  // Called exactly once, on whichever thread ran the step, with the output
  // [batch, new_tokens, hidden_size] in the dtype and on the device of
  // `hidden`, or with the error. No session lock is held during the call.
  std::function<void(absl::StatusOr<at::Tensor>)> done;
};

struct StepBatcherOptions {
  // Maximum tokens (sequences x new tokens, over all sessions) in one
  // forward pass. A step with more runs in chunks of at most this many
  // tokens, so that activation memory is bounded by the chunk, not by the
  // prompt. Chunked results equal one pass up to floating-point rounding.
  int64_t max_pass_tokens = 512;
};

// Thread-safe. Submit never blocks waiting for other sessions' steps. A
// Submit that finds no pass running runs passes itself until nothing is
// queued, while Submits from other threads only queue their task. A pass
// takes the steps that are queued when it starts, so one session runs with
// no wait and concurrent sessions share passes. When a pass has to wait
// for steps (see below), the batcher's own thread takes over the waiting
// and the passes after it. The submitting thread is usually the node's
// call loop, which must go on receiving the steps the pass waits for.
//
// Concurrent sessions drift apart: each pass takes the steps that happen
// to be there, and the others wait for the next pass. So when sessions
// that are still stepping have not sent their next step yet, a pass first
// waits for them. Where this node is the sessions' first hop (their range
// starts at block 0), the wait lasts up to one round of a session (the
// median time between its steps here), at most kMaxRoundWait. The
// sessions then regroup here and travel the rest of the chain together, so
// every node reads its weights once per round for all of them. Nodes that
// share a machine's memory bandwidth gain the most. Elsewhere a pass waits
// at most a quarter of the previous pass and kMaxGatherWait, for steps a
// little behind the others. A lone session never waits.
//
// A pass contains steps of one span and block range. Steps of sessions with
// LoRA adapters or deep prompts run alone. Within that, steps that fit the
// token budget whole run first, in arrival order: decode steps and short
// prompts. Longer steps then get chunks of the tokens left. The oldest step
// always gets at least one token, so every step progresses.
//
// Each pass checks, under each session's lock, that the session is open,
// that the step's position equals the tokens it contains and that the step
// fits max_length. A step that fails gets the error, and the others run. An
// error inside the pass fails every step in it. A session's position
// advances when its whole step is done.
class StepBatcher {
 public:
  explicit StepBatcher(StepBatcherOptions options);
  // Waits for a pass in progress, and stops the batcher's thread.
  ~StepBatcher();

  StepBatcher(const StepBatcher&) = delete;
  StepBatcher& operator=(const StepBatcher&) = delete;

  // Queues `task`, and runs it and any other queued steps on this thread
  // when no other thread is running passes.
  void Submit(StepTask task);
  // Queues every task before running any, so that they can share a pass.
  void Submit(std::vector<StepTask> tasks);

  // Stops waiting for steps of `session`, whose stream ended or which was
  // closed. Unknown sessions are ignored.
  void Forget(const Session* session);

  // Waits until no pass runs and no step is queued.
  void WaitIdle() const;

  const StepBatcherOptions& options() const { return options_; }

  // Forward passes run so far (chunks and batches count once each).
  int64_t passes_run() const { return passes_run_.load(); }

 private:
  struct Pending;

  // A step chosen for a pass and the new tokens it runs there.
  struct Member {
    Pending* pending;
    int64_t chunk;
  };

  // Runs passes until no step is queued or unfinished. Unless `may_wait`,
  // hands the queue to the batcher's thread at the first pass that would
  // wait for steps.
  void RunUntilIdle(bool may_wait);

  // The batcher's thread: runs passes that wait, when handed them.
  void WorkerLoop();

  // The batcher's record of a session that stepped recently.
  struct Activity {
    // Expires when the session's stream ends.
    std::weak_ptr<Session> session;
    int from = 0;
    int to = 0;
    absl::Time last_arrival;
  };

  // Records the arrival of a step of `session` at `now`, and the session's
  // round when it stepped before.
  void NoteArrival(const std::shared_ptr<Session>& session, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Returns the median of the recent rounds, or zero before the first.
  absl::Duration RoundTime() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Counts the live sessions on blocks [from, to) whose last step is at
  // most kActiveRounds rounds of length `round` old. Drops the records of
  // sessions that ended.
  size_t ActiveSessions(absl::Time now, int from, int to, absl::Duration round)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Returns how long the next pass waits for missing steps when its oldest
  // step is on blocks starting at `from` and a round lasts `round`.
  absl::Duration GatherWait(int from, absl::Duration round) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Chooses the steps of the next pass from `active`, oldest first.
  std::vector<Member> ChooseMembers(
      const std::vector<std::unique_ptr<Pending>>& active) const;

  // Runs one pass over some of `active`, removes the steps it finished or
  // failed, and calls their `done`.
  void RunPass(std::vector<std::unique_ptr<Pending>>& active);

  // Away from the first hop, a pass waits at most this part of the
  // previous pass's duration, and at most kMaxGatherWait, for the steps of
  // active sessions.
  static constexpr double kGatherFraction = 0.25;
  static constexpr absl::Duration kMaxGatherWait = absl::Milliseconds(5);
  // At the first hop, a pass waits at most one round, and at most this.
  static constexpr absl::Duration kMaxRoundWait = absl::Milliseconds(300);
  // A session counts as active while its last step is at most this many
  // rounds old, plus kRoundTripAllowance.
  static constexpr int kActiveRounds = 2;
  static constexpr absl::Duration kRoundTripAllowance = absl::Milliseconds(1);
  // Rounds kept for the median.
  static constexpr size_t kRoundsKept = 64;

  const StepBatcherOptions options_;
  std::atomic<int64_t> passes_run_{0};

  mutable absl::Mutex mu_;
  absl::Duration last_pass_time_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  // Sessions by identity. An entry whose session expired is stale.
  std::map<const Session*, Activity> activity_ ABSL_GUARDED_BY(mu_);
  // The latest rounds of all sessions, oldest first.
  std::deque<absl::Duration> rounds_ ABSL_GUARDED_BY(mu_);
  std::deque<std::unique_ptr<Pending>> queued_ ABSL_GUARDED_BY(mu_);
  // Set while a thread runs passes.
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  // Set when the batcher's thread is to continue the passes.
  bool worker_turn_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace pollen::node
