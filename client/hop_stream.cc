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

// Completion queue tags, one per kind of operation: the addresses of
// these bytes.
char write_tag_byte, read_tag_byte, other_tag_byte;
void* const kWriteTag = &write_tag_byte;
void* const kReadTag = &read_tag_byte;
void* const kOtherTag = &other_tag_byte;

}  // namespace

std::string DescribeHop(const scheduler::RouteHop& hop) {
  return absl::StrCat("node ", hop.server.node_id.substr(0, 12), " at ",
                      hop.server.address, " (blocks ", hop.start, ":",
                      hop.end, ")");
}

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
  // not awaited.
  context_.set_initial_metadata_corked(true);
  stream_ = stub_->PrepareAsyncInference(&context_, &queue_);
  stream_->StartCall(kOtherTag);
  *request_.mutable_open() = open;
  compression_ = open.compression();
  stream_->Write(request_, kWriteTag);
  write_pending_ = true;
  return Receive(0, timeout).status();
}

absl::StatusOr<HopStream::StepOutput> HopStream::Step(const at::Tensor& hidden,
                                                      int64_t position,
                                                      absl::Duration timeout) {
  POLLEN_RETURN_IF_ERROR(Send(hidden, position, {}));
  return Receive(position + hidden.size(1), timeout);
}

absl::Status HopStream::Send(const at::Tensor& hidden, int64_t position,
                             const std::vector<v1::PushTarget>& push_to) {
  POLLEN_RETURN_IF_ERROR(CheckUsable());
  // The previous write returned long ago, since its reply came back, but
  // its completion may still wait in the queue.
  if (write_pending_ &&
      !Drain(Clock::now() + kCloseTimeout, [this] { return !write_pending_; })) {
    Cancel();
    failed_ = true;
    return absl::DeadlineExceededError(absl::StrCat(
        DescribeHop(hop_), ": the previous step was not sent within ",
        kCloseTimeout.count(), " s"));
  }

  v1::InferenceStep* step = request_.mutable_step();
  POLLEN_RETURN_IF_ERROR(
      TensorToProto(hidden, step->mutable_hidden_states(), compression_));
  step->set_position(static_cast<uint32_t>(position));
  step->clear_push_to();
  for (const v1::PushTarget& target : push_to) *step->add_push_to() = target;

  // request_ stays untouched until the write returns.
  stream_->Write(request_, kWriteTag);
  write_pending_ = true;
  return absl::OkStatus();
}

absl::StatusOr<HopStream::StepOutput> HopStream::Receive(
    int64_t end_position, absl::Duration timeout) {
  POLLEN_ASSIGN_OR_RETURN(std::optional<StepOutput> output,
                          Poll(end_position, absl::Now() + timeout));
  if (output.has_value()) return *std::move(output);
  Cancel();
  failed_ = true;
  return absl::DeadlineExceededError(absl::StrCat(
      DescribeHop(hop_), " did not answer within ",
      absl::FormatDuration(timeout)));
}

absl::StatusOr<std::optional<HopStream::StepOutput>> HopStream::Poll(
    int64_t end_position, absl::Time deadline) {
  POLLEN_RETURN_IF_ERROR(CheckUsable());
  while (true) {
    if (!read_pending_ && !read_returned_) {
      stream_->Read(&response_, kReadTag);
      read_pending_ = true;
    }
    if (!Drain(absl::ToChronoTime(deadline), [this] { return read_returned_; })) {
      return std::nullopt;
    }
    read_returned_ = false;
    if (!read_ok_) return FailFromStatus();
    if (response_.position() == end_position) break;
    POLLEN_LOG_DEBUG("{}: dropped a late reply ending at position {}",
                     DescribeHop(hop_), response_.position());
  }

  // The output is copied out of the response, which the next step reuses.
  return StepOutputFromResponse(response_, hop_);
}

absl::StatusOr<HopStream::StepOutput> StepOutputFromResponse(
    const v1::InferenceResponse& response, const scheduler::RouteHop& hop) {
  auto named = [&hop](const absl::Status& status) {
    return absl::Status(status.code(), absl::StrCat(DescribeHop(hop), ": ",
                                                    status.message()));
  };

  HopStream::StepOutput output;
  output.draining = response.draining();
  if (response.has_hidden_states()) {
    absl::StatusOr<at::Tensor> hidden =
        TensorFromProto(response.hidden_states(), "output");
    if (!hidden.ok()) return named(hidden.status());
    output.hidden = *std::move(hidden);
  }
  for (const v1::HopOutput& entry : response.trail()) {
    HopStream::TrailEntry& copied = output.trail.emplace_back();
    copied.draining = entry.draining();
    absl::StatusOr<at::Tensor> hidden =
        TensorFromProto(entry.hidden_states(), "trail entry");
    if (!hidden.ok()) return named(hidden.status());
    copied.hidden = *std::move(hidden);
  }
  return output;
}

absl::Status HopStream::CheckUsable() const {
  if (failed_ || closed_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stream to ", DescribeHop(hop_), " already failed or closed"));
  }
  return absl::OkStatus();
}

absl::Status HopStream::FailFromStatus() {
  // The node ended the stream, and its status gives the reason.
  failed_ = true;
  stream_->Finish(&finish_status_, kOtherTag);
  ++other_pending_;
  if (!Drain(Clock::now() + kCloseTimeout,
             [this] { return other_pending_ == 0; })) {
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

template <typename Done>
bool HopStream::Drain(Clock::time_point deadline, Done done) {
  while (!done()) {
    void* tag = nullptr;
    bool ok = false;
    const grpc::CompletionQueue::NextStatus next =
        queue_.AsyncNext(&tag, &ok, deadline);
    if (next == grpc::CompletionQueue::TIMEOUT) return false;
    if (next == grpc::CompletionQueue::SHUTDOWN) {
      // Only the destructor shuts the queue down, after the last wait.
      write_pending_ = read_pending_ = false;
      other_pending_ = 0;
      read_returned_ = true;
      read_ok_ = false;
      return true;
    }
    if (tag == kWriteTag) {
      write_pending_ = false;
    } else if (tag == kReadTag) {
      read_pending_ = false;
      read_returned_ = true;
      read_ok_ = ok;
    } else {
      --other_pending_;
    }
  }
  return true;
}

void HopStream::Cancel() {
  context_.TryCancel();
  Drain(Clock::time_point::max(), [this] {
    return !write_pending_ && !read_pending_ && other_pending_ == 0;
  });
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
  // end of stream and frees the session at once. A read still pending
  // returns when the node finishes. The last step's write must be back
  // before the half-close starts.
  if (write_pending_ &&
      !Drain(Clock::now() + kCloseTimeout, [this] { return !write_pending_; })) {
    Cancel();
    return;
  }
  stream_->WritesDone(kOtherTag);
  stream_->Finish(&finish_status_, kOtherTag);
  other_pending_ += 2;
  if (!Drain(Clock::now() + kCloseTimeout, [this] {
        return !write_pending_ && !read_pending_ && other_pending_ == 0;
      })) {
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
