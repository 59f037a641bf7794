#include "node/compute_queue.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace pollen::node {

ComputeQueue::ComputeQueue(int max_queued)
    : max_queued_(max_queued), worker_([this] { WorkerLoop(); }) {}

ComputeQueue::~ComputeQueue() { Stop(); }

void ComputeQueue::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (worker_.joinable()) worker_.join();

  // Jobs still queued only report the shutdown.
  std::deque<Job> left;
  {
    absl::MutexLock lock(&mu_);
    left.swap(jobs_);
  }
  for (Job& job : left) job(/*cancelled=*/true);
}

absl::Status ComputeQueue::Submit(Job job) {
  absl::MutexLock lock(&mu_);
  if (stopping_) {
    return absl::UnavailableError("node is shutting down; use another node");
  }
  if (static_cast<int>(jobs_.size()) >= max_queued_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "training queue is full: ", jobs_.size(), " requests wait, the limit is ",
        max_queued_, "; retry later or use another node"));
  }
  jobs_.push_back(std::move(job));
  return absl::OkStatus();
}

int ComputeQueue::queued() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(jobs_.size());
}

ComputeQueue::InferenceScope::InferenceScope(ComputeQueue* queue)
    : queue_(queue) {
  if (queue_ == nullptr) return;
  absl::MutexLock lock(&queue_->mu_);
  ++queue_->inference_steps_;
}

ComputeQueue::InferenceScope::~InferenceScope() {
  if (queue_ == nullptr) return;
  absl::MutexLock lock(&queue_->mu_);
  --queue_->inference_steps_;
}

void ComputeQueue::WorkerLoop() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || (!jobs_.empty() && inference_steps_ == 0);
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job(/*cancelled=*/false);
  }
}

}  // namespace pollen::node
