// Runs the inference steps of a node's sessions: steps that wait at the
// same time run as one batched forward pass (continuous batching), and
// long steps run in chunks (chunked prefill).
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
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

// Thread-safe. There is no worker thread: a Submit that finds no pass
// running runs passes itself until nothing is queued, while Submits from
// other threads only queue their task. A pass takes the steps that are
// queued when it starts, so one session runs with no wait and concurrent
// sessions share passes.
//
// A pass contains steps of one span and block range. Steps of sessions with
// LoRA adapters or deep prompts run alone. Within that, steps that fit the
// token budget whole run first, in arrival order: decode steps and short
// prompts. Longer steps then get chunks of the tokens left. The oldest step
// always gets at least one token, so every step progresses.
//
// Each pass checks, under each session's lock, that the session is open,
// that the step's position equals the tokens it holds and that the step
// fits max_length; a step that fails gets the error and the others run. An
// error inside the pass fails every step in it. A session's position
// advances when its whole step is done.
class StepBatcher {
 public:
  explicit StepBatcher(StepBatcherOptions options);
  // Waits for a pass in progress.
  ~StepBatcher();

  StepBatcher(const StepBatcher&) = delete;
  StepBatcher& operator=(const StepBatcher&) = delete;

  // Queues `task`, and runs it and any other queued steps on this thread
  // when no other thread is running passes.
  void Submit(StepTask task);

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

  // Runs passes until no step is queued or unfinished.
  void RunUntilIdle();

  // Chooses the steps of the next pass from `active`, oldest first.
  std::vector<Member> ChooseMembers(
      const std::vector<std::unique_ptr<Pending>>& active) const;

  // Runs one pass over some of `active`, removes the steps it finished or
  // failed, and calls their `done`.
  void RunPass(std::vector<std::unique_ptr<Pending>>& active);

  const StepBatcherOptions options_;
  std::atomic<int64_t> passes_run_{0};

  absl::Mutex mu_;
  std::deque<std::unique_ptr<Pending>> queued_ ABSL_GUARDED_BY(mu_);
  // Set while a thread runs passes.
  bool running_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace pollen::node
