#include "node/step_pusher.h"

#include <algorithm>
#include <deque>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::node {
namespace {

// A message of queued steps stops growing past this size. A larger step
// still goes out alone.
constexpr size_t kMaxCoalescedBytes = size_t{8} << 20;

using StepList = std::vector<std::unique_ptr<v1::PushedStep>>;

// The status a rejection carries, with the rejecting node's address.
absl::Status RejectionStatus(const std::string& address,
                             const v1::PushRejection& rejection) {
  int code = rejection.code();
  if (code <= 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<int>(absl::StatusCode::kUnknown);
  }
  return absl::Status(static_cast<absl::StatusCode>(code),
                      absl::StrCat("node at ", address, " rejected the push: ",
                                   rejection.message()));
}

}  // namespace

absl::Status ValidatePushTarget(const v1::PushTarget& target,
                                size_t max_session_id_length) {
  const std::string& address = target.address();
  if (address.empty() || address.size() > kMaxPushAddressLength ||
      !absl::StrContains(address, ':')) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push_to.address must be host:port of at most ", kMaxPushAddressLength,
        " characters, got '", address.substr(0, kMaxPushAddressLength), "' (",
        address.size(), " characters)"));
  }
  if (target.session_id().empty() ||
      target.session_id().size() > max_session_id_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push_to.session_id must have 1 to ", max_session_id_length,
        " characters, got ", target.session_id().size()));
  }
  return absl::OkStatus();
}

// One PushSteps call to one node. A hold keeps the reactor from its OnDone
// until the call broke or was cancelled, so that Push may start writes at
// any time, and a read stays pending for the node's rejections. The owner
// deletes it after OnDone, once no Push uses it.
class StepPusher::Stream final
    : public ClientStreamReactor<v1::PushRequest, v1::PushRejection> {
 public:
  Stream(StepPusher* owner, std::string address,
         std::shared_ptr<grpc::Channel> channel, CallLoop* loop)
      : owner_(owner),
        address_(std::move(address)),
        stub_(v1::BlockService::NewStub(std::move(channel))),
        loop_(loop) {}

  const std::string& address() const { return address_; }

  // Pins held by Push and Shutdown calls that use the stream outside the
  // owner's lock, and whether gRPC is done with it.
  int pins ABSL_GUARDED_BY(owner_->mu_) = 0;
  bool done ABSL_GUARDED_BY(owner_->mu_) = false;

  // Binds the call and starts it, then writes what was queued meanwhile.
  // Until then Enqueue only queues, since writes need the bound call.
  void Start() {
    POLLEN_LOG_DEBUG("opening a push stream to {}", address_);
    Bind(loop_, stub_->PrepareAsyncPushSteps(&context(), loop_->queue()));
    AddHold();
    StartRead(&rejection_);
    StartCall();
    {
      absl::MutexLock lock(&mu_);
      started_ = true;
    }
    Flush();
  }

  // Queues `pushed` and, unless `hold` or the stream has not started,
  // starts a write when none is in flight. Returns the step when the stream
  // already broke.
  std::unique_ptr<v1::PushedStep> Enqueue(
      std::unique_ptr<v1::PushedStep> pushed, bool hold) {
    {
      absl::MutexLock lock(&mu_);
      if (broken_) return pushed;
      queued_.push_back(std::move(pushed));
      if (hold || !started_ || writing_) return nullptr;
      writing_ = true;
      FillRequest();
    }
    StartWrite(&request_);
    return nullptr;
  }

  // Starts writing held steps when no write is in flight.
  void Flush() {
    {
      absl::MutexLock lock(&mu_);
      if (!started_ || broken_ || writing_ || queued_.empty()) return;
      writing_ = true;
      FillRequest();
    }
    StartWrite(&request_);
  }

  void Cancel() { context().TryCancel(); }

  // Fails the queued steps of a stream that never started, and every later
  // one.
  void FailUnstarted(const absl::Status& status) {
    StepList failed;
    {
      absl::MutexLock lock(&mu_);
      broken_ = true;
      hold_released_ = true;
      TakeQueued(&failed);
    }
    Fail(std::move(failed), status);
  }

  void OnWriteDone(bool ok) override {
    StepList failed;
    bool write = false;
    bool release = false;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        broken_ = true;
        TakeRequestSteps(&failed);
      }
      request_.Clear();
      if (broken_) {
        TakeQueued(&failed);
        release = ReleaseHoldOnce();
      } else if (!queued_.empty()) {
        FillRequest();
        writing_ = true;
        write = true;
      }
    }
    if (!ok) owner_->Forget(this);
    Fail(std::move(failed),
         Broken("the stream broke before the step was written"));
    if (write) StartWrite(&request_);
    if (release) RemoveHold();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The node ended the call; OnDone gives its status.
      StepList failed;
      bool release = false;
      {
        absl::MutexLock lock(&mu_);
        broken_ = true;
        TakeQueued(&failed);
        if (!writing_) release = ReleaseHoldOnce();
      }
      owner_->Forget(this);
      Fail(std::move(failed), Broken("the node ended the push stream"));
      if (release) RemoveHold();
      return;
    }

    auto pushed = std::make_unique<v1::PushedStep>();
    pushed->Swap(rejection_.mutable_pushed());
    const absl::Status status = RejectionStatus(address_, rejection_);
    StartRead(&rejection_);
    POLLEN_LOG_WARN("session {}: {}", pushed->from_session_id(),
                    status.ToString());
    owner_->on_failure_(std::move(pushed), status);
  }

  void OnDone(const grpc::Status& status) override {
    if (status.ok() || status.error_code() == grpc::StatusCode::CANCELLED) {
      POLLEN_LOG_DEBUG("push stream to {} ended: {}", address_,
                       status.error_message());
    } else {
      POLLEN_LOG_WARN("push stream to {} ended: {}", address_,
                      FromGrpcStatus(status).ToString());
    }
    owner_->StreamDone(this);
  }

 private:
  // Moves queued steps into request_, up to kMaxCoalescedBytes.
  void FillRequest() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    request_.Clear();
    size_t bytes = 0;
    while (!queued_.empty()) {
      const size_t size = queued_.front()->ByteSizeLong();
      if (request_.steps_size() > 0 && bytes + size > kMaxCoalescedBytes) break;
      request_.mutable_steps()->AddAllocated(queued_.front().release());
      queued_.pop_front();
      bytes += size;
    }
  }

  void TakeRequestSteps(StepList* steps) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const size_t first = steps->size();
    while (request_.steps_size() > 0) {
      steps->emplace_back(request_.mutable_steps()->ReleaseLast());
    }
    std::reverse(steps->begin() + static_cast<std::ptrdiff_t>(first),
                 steps->end());
  }

  void TakeQueued(StepList* steps) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (auto& step : queued_) steps->push_back(std::move(step));
    queued_.clear();
  }

  // Returns true the first time it is called: the caller removes the hold.
  bool ReleaseHoldOnce() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (hold_released_) return false;
    hold_released_ = true;
    return true;
  }

  // Hands `steps` back to the failure handler with `status`.
  void Fail(StepList steps, const absl::Status& status) {
    for (auto& step : steps) {
      POLLEN_LOG_WARN("session {}: {}", step->from_session_id(),
                      status.ToString());
      owner_->on_failure_(std::move(step), status);
    }
  }

  absl::Status Broken(const char* reason) const {
    return absl::UnavailableError(
        absl::StrCat("push to ", address_, ": ", reason));
  }

  StepPusher* const owner_;
  const std::string address_;
  const std::unique_ptr<v1::BlockService::Stub> stub_;
  CallLoop* const loop_;
  v1::PushRejection rejection_;

  absl::Mutex mu_;
  // The message being written, unchanged until its write completes.
  v1::PushRequest request_;
  std::deque<std::unique_ptr<v1::PushedStep>> queued_ ABSL_GUARDED_BY(mu_);
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool hold_released_ ABSL_GUARDED_BY(mu_) = false;
};

namespace {

// The innermost Batch of this thread, or null.
thread_local StepPusher::Batch* current_batch = nullptr;

}  // namespace

StepPusher::Batch::Batch() : outer_(current_batch) { current_batch = this; }

StepPusher::Batch::~Batch() {
  current_batch = outer_;
  if (outer_ != nullptr) {
    outer_->held_.insert(outer_->held_.end(), held_.begin(), held_.end());
    for (std::function<void()>& work : after_pushes_) {
      outer_->after_pushes_.push_back(std::move(work));
    }
    return;
  }
  for (const HeldStream& held : held_) {
    held.stream->Flush();
    held.pusher->Unpin(held.stream);
  }
  for (std::function<void()>& work : after_pushes_) work();
}

void StepPusher::Batch::RunAfterPushes(std::function<void()> work) {
  if (current_batch == nullptr) {
    work();
    return;
  }
  current_batch->after_pushes_.push_back(std::move(work));
}

StepPusher::StepPusher(PushFailureHandler on_failure)
    : on_failure_(std::move(on_failure)) {}

StepPusher::~StepPusher() { Shutdown(); }

void StepPusher::SetTargetCheck(PushTargetCheck check) {
  check_ = std::move(check);
}

void StepPusher::SetCallLoop(CallLoop* loop) {
  absl::MutexLock lock(&mu_);
  loop_ = loop;
}

void StepPusher::Push(const std::string& address, int block,
                      std::unique_ptr<v1::PushedStep> pushed) {
  Stream* stream = nullptr;
  bool start = false;
  {
    absl::MutexLock lock(&mu_);
    if (!shut_down_ && loop_ != nullptr) {
      auto it = streams_.find(address);
      if (it == streams_.end()) {
        stream = new Stream(this, address, channels_.Get(address), loop_);
        streams_[address] = stream;
        ++live_streams_;
        if (check_) {
          // The checker starts the stream; its steps wait until then.
          ++stream->pins;
          unchecked_.emplace_back(stream, block);
          if (!checker_.joinable()) checker_ = std::thread([this] { RunChecks(); });
        } else {
          start = true;
        }
      } else {
        stream = it->second;
      }
      ++stream->pins;
    }
  }
  if (stream == nullptr) {
    on_failure_(std::move(pushed),
                absl::UnavailableError(
                    "this node is shutting down or has no push streams"));
    return;
  }

  // Outside the lock, because Enqueue may fail steps.
  // A batch keeps the pin until it sends.
  if (start) stream->Start();
  Batch* batch = current_batch;
  std::unique_ptr<v1::PushedStep> rejected =
      stream->Enqueue(std::move(pushed), /*hold=*/batch != nullptr);
  if (batch != nullptr && rejected == nullptr) {
    batch->held_.push_back(Batch::HeldStream{this, stream});
  } else {
    Unpin(stream);
  }
  if (rejected != nullptr) {
    on_failure_(std::move(rejected),
                absl::UnavailableError(absl::StrCat(
                    "push to ", address, ": the stream has just broken")));
  }
}

void StepPusher::RunChecks() {
  while (true) {
    std::pair<Stream*, int> next;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return shut_down_ || !unchecked_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (unchecked_.empty()) return;
      next = unchecked_.front();
      unchecked_.pop_front();
    }
    Stream* stream = next.first;
    const absl::Time check_start = absl::Now();
    absl::Status status = check_(stream->address(), next.second);
    const absl::Duration check_time = absl::Now() - check_start;
    {
      absl::MutexLock lock(&mu_);
      if (status.ok() && shut_down_) {
        status = absl::UnavailableError("this node is shutting down");
      }
    }

    if (status.ok()) {
      POLLEN_LOG_INFO("pushing to {}, which serves block {} (checked in {})",
                      stream->address(), next.second,
                      absl::FormatDuration(check_time));
      stream->Start();
    } else {
      status = absl::Status(status.code(),
                            absl::StrCat("push to ", stream->address(),
                                         " rejected: ", status.message()));
      POLLEN_LOG_WARN("{}", status.ToString());
      Forget(stream);
      stream->FailUnstarted(status);
      StreamDone(stream);
    }
    Unpin(stream);
  }
}

void StepPusher::Shutdown(absl::Duration timeout) {
  std::vector<Stream*> streams;
  std::deque<std::pair<Stream*, int>> unchecked;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    for (auto& [address, stream] : streams_) {
      ++stream->pins;
      streams.push_back(stream);
    }
    streams_.clear();
    unchecked.swap(unchecked_);
  }

  // Streams still waiting for their check never start.
  const absl::Status stopping =
      absl::UnavailableError("this node is shutting down");
  for (const auto& [stream, block] : unchecked) {
    stream->FailUnstarted(stopping);
    StreamDone(stream);
    Unpin(stream);
  }
  if (checker_.joinable()) checker_.join();
  for (Stream* stream : streams) {
    stream->Cancel();
    Unpin(stream);
  }

  absl::MutexLock lock(&mu_);
  auto all_done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return live_streams_ == 0;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&all_done), timeout)) {
    POLLEN_LOG_WARN("{} push streams still open after {}", live_streams_,
                    absl::FormatDuration(timeout));
  }
}

void StepPusher::Forget(Stream* stream) {
  absl::MutexLock lock(&mu_);
  auto it = streams_.find(stream->address());
  if (it != streams_.end() && it->second == stream) streams_.erase(it);
}

void StepPusher::Unpin(Stream* stream) {
  bool remove = false;
  {
    absl::MutexLock lock(&mu_);
    remove = --stream->pins == 0 && stream->done;
  }
  if (remove) delete stream;
}

void StepPusher::StreamDone(Stream* stream) {
  bool remove = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = streams_.find(stream->address());
    if (it != streams_.end() && it->second == stream) streams_.erase(it);
    stream->done = true;
    --live_streams_;
    remove = stream->pins == 0;
  }
  if (remove) delete stream;
}

}  // namespace pollen::node
