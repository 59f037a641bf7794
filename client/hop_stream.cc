#include "client/hop_stream.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"

namespace pollen::client {
namespace {

// A node gets this long to finish a stream that the client half-closed.
constexpr std::chrono::seconds kCloseTimeout(5);

// Completion queue tags. Only the count of pending operations matters, so
// every operation uses the same tag.
void* const kOperationTag = reinterpret_cast<void*>(1);

std::string DescribeHop(const scheduler::RouteHop& hop) {
  return absl::StrCat("node ", hop.server.node_id.substr(0, 12), " at ",
                      hop.server.address, " (blocks ", hop.start, ":",
                      hop.end, ")");
}

}  // namespace

HopStream::HopStream(scheduler::RouteHop hop,
                     std::shared_ptr<grpc::Channel> channel)
    : hop_(std::move(hop)),
      stub_(v1::BlockService::NewStub(std::move(channel))) {}

HopStream::~HopStream() {
  Close();
  queue_.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (queue_.Next(&tag, &ok)) {
  }
}

absl::Status HopStream::Open(const v1::InferenceOpen& open,
                             absl::Duration timeout) {
  // The call's headers go out with the open message, in one write. With
  // corked metadata, gRPC returns no completion for StartCall itself
  // (ClientAsyncReaderWriter::StartCallInternal in gRPC 1.51), so it is
  // not counted as pending.
  context_.set_initial_metadata_corked(true);
  stream_ = stub_->PrepareAsyncInference(&context_, &queue_);
  stream_->StartCall(kOperationTag);
  *request_.mutable_open() = open;
  compression_ = open.compression();
  return Exchange(timeout);
}

absl::StatusOr<HopStream::StepOutput> HopStream::Step(const at::Tensor& hidden,
                                                      int64_t position,
                                                      absl::Duration timeout) {
  POLLEN_RETURN_IF_ERROR(Send(hidden, position, {}));
  return Receive(timeout);
}

absl::Status HopStream::Send(const at::Tensor& hidden, int64_t position,
                             const std::vector<v1::PushTarget>& push_to) {
  POLLEN_RETURN_IF_ERROR(CheckUsable());
  v1::InferenceStep* step = request_.mutable_step();
  POLLEN_RETURN_IF_ERROR(
      TensorToProto(hidden, step->mutable_hidden_states(), compression_));
  step->set_position(static_cast<uint32_t>(position));
  step->clear_push_to();
  for (const v1::PushTarget& target : push_to) *step->add_push_to() = target;

  // The write completes while Receive waits; request_ stays untouched
  // until then.
  operation_failed_ = false;
  stream_->Write(request_, kOperationTag);
  ++pending_;
  return absl::OkStatus();
}

absl::StatusOr<HopStream::StepOutput> HopStream::Receive(
    absl::Duration timeout) {
  POLLEN_RETURN_IF_ERROR(AwaitReply(timeout));

  // The output is copied out of the response, which the next step reuses.
  StepOutput output;
  output.draining = response_.draining();
  output.pushed = response_.pushed();
  POLLEN_ASSIGN_OR_RETURN(
      output.hidden,
      TensorFromProto(response_.hidden_states(),
                      absl::StrCat("output of ", DescribeHop(hop_))));
  return output;
}

absl::Status HopStream::CheckUsable() const {
  if (failed_ || closed_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stream to ", DescribeHop(hop_), " already failed or closed"));
  }
  return absl::OkStatus();
}

absl::Status HopStream::Exchange(absl::Duration timeout) {
  POLLEN_RETURN_IF_ERROR(CheckUsable());
  operation_failed_ = false;
  stream_->Write(request_, kOperationTag);
  ++pending_;
  return AwaitReply(timeout);
}

absl::Status HopStream::AwaitReply(absl::Duration timeout) {
  POLLEN_RETURN_IF_ERROR(CheckUsable());
  const Clock::time_point deadline =
      Clock::now() + absl::ToChronoMilliseconds(timeout);

  // The read, and the write when one is in flight, are polled here.
  stream_->Read(&response_, kOperationTag);
  ++pending_;
  if (!AwaitPending(deadline)) {
    Cancel();
    failed_ = true;
    return absl::DeadlineExceededError(
        absl::StrCat(DescribeHop(hop_), " did not answer within ",
                     absl::FormatDuration(timeout)));
  }
  if (!operation_failed_) return absl::OkStatus();

  // The node ended the stream, and its status gives the reason.
  failed_ = true;
  stream_->Finish(&finish_status_, kOperationTag);
  ++pending_;
  if (!AwaitPending(Clock::now() + kCloseTimeout)) {
    Cancel();
    return absl::UnavailableError(absl::StrCat(
        DescribeHop(hop_), ": stream broke and the node sent no status"));
  }
  const absl::Status error =
      finish_status_.ok()
          ? absl::UnavailableError("stream closed without a reply")
          : FromGrpcStatus(finish_status_);
  return absl::Status(error.code(), absl::StrCat(DescribeHop(hop_), ": ",
                                                 error.message()));
}

bool HopStream::AwaitPending(Clock::time_point deadline) {
  while (pending_ > 0) {
    void* tag = nullptr;
    bool ok = false;
    const grpc::CompletionQueue::NextStatus next =
        queue_.AsyncNext(&tag, &ok, deadline);
    if (next == grpc::CompletionQueue::TIMEOUT) return false;
    if (next == grpc::CompletionQueue::SHUTDOWN) {
      // Only the destructor shuts the queue down, after the last wait.
      pending_ = 0;
      operation_failed_ = true;
      return true;
    }
    --pending_;
    if (!ok) operation_failed_ = true;
  }
  return true;
}

void HopStream::Cancel() {
  context_.TryCancel();
  AwaitPending(Clock::time_point::max());
}

void HopStream::Abort() {
  if (stream_ == nullptr || closed_) return;
  closed_ = true;
  Cancel();
}

void HopStream::Close() {
  if (stream_ == nullptr || closed_) return;
  closed_ = true;
  if (failed_) {
    Cancel();
    return;
  }

  // Half-close, then collect the status, so that the node reads a clean
  // end of stream and frees the session at once.
  stream_->WritesDone(kOperationTag);
  stream_->Finish(&finish_status_, kOperationTag);
  pending_ += 2;
  if (!AwaitPending(Clock::now() + kCloseTimeout)) {
    POLLEN_LOG_DEBUG("closing stream to {}: no status within {} s; cancelled",
                     DescribeHop(hop_), kCloseTimeout.count());
    Cancel();
    return;
  }
  if (!finish_status_.ok()) {
    POLLEN_LOG_DEBUG("closing stream to {}: {}", DescribeHop(hop_),
                     finish_status_.error_message());
  }
}

}  // namespace pollen::client
