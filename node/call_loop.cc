#include "node/call_loop.h"

#include "common/logging.h"

namespace pollen::node {

CallLoop::CallLoop(std::unique_ptr<grpc::Server> server,
                   std::unique_ptr<grpc::ServerCompletionQueue> queue)
    : server_(std::move(server)), queue_(std::move(queue)) {}

CallLoop::~CallLoop() { Stop(absl::ZeroDuration()); }

void CallLoop::Start() {
  thread_ = std::thread([this] { Run(); });
}

void CallLoop::Stop(absl::Duration grace) {
  if (stopped_) return;
  stopped_ = true;

  // The thread must keep running meanwhile: the server waits until the
  // calls' reactors have seen their ends and freed them.
  server_->Shutdown(std::chrono::system_clock::now() +
                    absl::ToChronoMilliseconds(grace));
  server_->Wait();
  queue_->Shutdown();
  if (thread_.joinable()) {
    thread_.join();
  } else {
    Run();
  }
  POLLEN_LOG_DEBUG("call loop stopped");
}

void CallLoop::Run() {
  void* tag = nullptr;
  bool ok = false;
  while (queue_->Next(&tag, &ok)) static_cast<CallTag*>(tag)->Run(ok);
}

}  // namespace pollen::node
