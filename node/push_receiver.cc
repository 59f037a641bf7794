#include "node/push_receiver.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/inference_reactor.h"
#include "node/session_manager.h"

namespace pollen::node {
PushReceiver::PushReceiver(ServiceContext* context, std::unique_ptr<Call> call)
    : ServerStreamReactor(std::move(call)), context_(context), peer_(peer()) {
  POLLEN_LOG_DEBUG("push stream from {} opened", peer_);
  StartRead(&request_);
}

void PushReceiver::OnReadDone(bool ok) {
  if (!ok) {
    {
      absl::MutexLock lock(&mu_);
      read_ended_ = true;
    }
    FinishIfIdle();
    return;
  }

  v1::PushRequest request;
  request.Swap(&request_);
  std::vector<StepTask> tasks;
  for (v1::PushedStep& pushed : *request.mutable_steps()) {
    const absl::Status status =
        DeliverStep(context_, StepOrigin::kNode, pushed.mutable_step(), &tasks);
    if (!status.ok()) Reject(std::move(pushed), status);
  }

  if (!tasks.empty()) context_->sessions->SubmitSteps(std::move(tasks));
  StartRead(&request_);
}

void PushReceiver::Reject(v1::PushedStep pushed, const absl::Status& status) {
  POLLEN_LOG_WARN("rejected a push for session {} from {}: {}",
                  pushed.step().session_id().substr(0, kMaxSessionIdLength),
                  peer_, status.ToString());
  v1::PushRejection rejection;
  *rejection.mutable_pushed() = std::move(pushed);
  rejection.set_code(static_cast<int>(status.code()));
  rejection.set_message(std::string(status.message()));
  {
    absl::MutexLock lock(&mu_);
    if (writing_) {
      rejections_.push_back(std::move(rejection));
      return;
    }
    writing_ = true;
    writing_message_ = std::move(rejection);
  }
  StartWrite(&writing_message_);
}

void PushReceiver::OnWriteDone(bool ok) {
  bool write = false;
  {
    absl::MutexLock lock(&mu_);
    if (!ok && !rejections_.empty()) {
      POLLEN_LOG_WARN("push stream from {} broke; {} rejections not sent",
                      peer_, rejections_.size());
      rejections_.clear();
    }
    if (rejections_.empty()) {
      writing_ = false;
    } else {
      writing_message_ = std::move(rejections_.front());
      rejections_.pop_front();
      write = true;
    }
  }
  if (write) {
    StartWrite(&writing_message_);
  } else {
    FinishIfIdle();
  }
}

void PushReceiver::FinishIfIdle() {
  {
    absl::MutexLock lock(&mu_);
    if (finished_ || !read_ended_ || writing_) return;
    finished_ = true;
  }
  POLLEN_LOG_DEBUG("push stream from {} ended", peer_);
  Finish(grpc::Status::OK);
}

void PushReceiver::OnDone() { delete this; }

}  // namespace pollen::node
