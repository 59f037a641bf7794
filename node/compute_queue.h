// Orders training work (Forward and Backward RPCs) behind inference steps.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace pollen::node {

// One worker thread runs queued training jobs in arrival order, one at a
// time, and starts a job only while no inference step is waiting or
// running. Inference steps never wait for the queue: a step that arrives
// while a job runs runs beside it, and the next job waits until no step is
// in progress. Training therefore gets the time that inference leaves.
//
// Thread-safe. Stop, which the destructor calls, stops the worker after
// the running job and calls each job still queued with `cancelled` set.
//
// NOTE: the queue bounds the number of waiting requests, not their bytes.
// Each waiting Forward or Backward request keeps its payload (up to 1 GiB)
// in memory.
class ComputeQueue {
 public:
  // A job gets `cancelled` true when the queue is shutting down and it
  // must only report that.
  using Job = std::function<void(bool cancelled)>;

  explicit ComputeQueue(int max_queued = 64);
  // Calls Stop.
  ~ComputeQueue();

  // Waits for the running job, then calls every queued job with
  // `cancelled` set, on this thread. Later Submits fail. Idempotent.
  void Stop();

  ComputeQueue(const ComputeQueue&) = delete;
  ComputeQueue& operator=(const ComputeQueue&) = delete;

  // Queues `job`. RESOURCE_EXHAUSTED naming the limit when max_queued jobs
  // are already waiting; `job` is then not called.
  absl::Status Submit(Job job);

  // Marks one inference step in progress for as long as it lives.
  class InferenceScope {
   public:
    explicit InferenceScope(ComputeQueue* queue);
    ~InferenceScope();
    InferenceScope(const InferenceScope&) = delete;
    InferenceScope& operator=(const InferenceScope&) = delete;

   private:
    ComputeQueue* const queue_;
  };

  // Jobs waiting, not counting the one running.
  int queued() const;

 private:
  void WorkerLoop();

  const int max_queued_;
  mutable absl::Mutex mu_;
  std::deque<Job> jobs_ ABSL_GUARDED_BY(mu_);
  int inference_steps_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace pollen::node
