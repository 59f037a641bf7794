#include "node/call_loop.h"

#include "common/logging.h"

namespace pollen::node {

CallLoop::CallLoop(std::unique_ptr<grpc::Server> server,
                   std::unique_ptr<grpc::ServerCompletionQueue> queue)
    : server_(std::move(server)), queue_(std::move(queue)) {}

CallLoop::~CallLoop() { Stop(absl::Seconds(10)); }

void CallLoop::Start() {
  thread_ = std::thread([this] { Run(); });
}

void CallLoop::AddCall() {
  absl::MutexLock lock(&mu_);
  ++live_calls_;
}

void CallLoop::RemoveCall() {
  absl::MutexLock lock(&mu_);
  --live_calls_;
}

void CallLoop::ShutdownServer(absl::Duration grace) {
  if (server_shut_down_) return;
  server_shut_down_ = true;
  server_->Shutdown(std::chrono::system_clock::now() +
                    absl::ToChronoMilliseconds(grace));
}

void CallLoop::Stop(absl::Duration timeout) {
  if (stopped_) return;
  stopped_ = true;
  ShutdownServer(absl::ZeroDuration());

  // The thread keeps running the calls' ends meanwhile. A call that never
  // ends keeps the queue open, because shutting it down would abort the
  // process at the call's next operation.
  {
    absl::MutexLock lock(&mu_);
    auto ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return live_calls_ == 0;
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&ended), timeout)) {
      POLLEN_LOG_ERROR(
          "{} calls still live {} after the server shut down; leaving the "
          "completion queue open",
          live_calls_, absl::FormatDuration(timeout));
      if (thread_.joinable()) thread_.detach();
      static_cast<void>(server_.release());
      static_cast<void>(queue_.release());
      return;
    }
  }

  queue_->Shutdown();
  if (thread_.joinable()) thread_.join();
  POLLEN_LOG_DEBUG("call loop stopped");
}

void CallLoop::Run() {
  void* tag = nullptr;
  bool ok = false;
  while (queue_->Next(&tag, &ok)) static_cast<CallTag*>(tag)->Run(ok);
}

}  // namespace pollen::node
