// One Inference stream from a client to one node.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>
#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "scheduler/route.h"

namespace pollen::client {

// An Inference stream to the node of one route hop: an open, then one step
// at a time, each with a deadline. It uses gRPC's asynchronous API with a
// completion queue of its own that the calling thread polls while it
// waits, so a step needs no helper thread, and a step that overruns its
// deadline cancels the call. The request and response messages are reused
// from step to step, so their buffers are allocated once.
//
// Thread-compatible: one call at a time. After a failure every later call
// fails at once; the chain replaces the hop.
class HopStream {
 public:
  struct StepOutput {
    at::Tensor hidden;  // [batch, new_tokens, hidden], owning its memory
    bool draining = false;
    // The node pushed `hidden` to the first of the step's push targets.
    bool pushed = false;
  };

  HopStream(scheduler::RouteHop hop, std::shared_ptr<grpc::Channel> channel);
  // Closes the stream and waits until gRPC has returned every operation.
  ~HopStream();

  HopStream(const HopStream&) = delete;
  HopStream& operator=(const HopStream&) = delete;

  // Starts the call and sends `open`. Later steps encode their hidden
  // states with open.compression(). Returns the node's error (with the hop
  // in the message), or DEADLINE_EXCEEDED when no reply arrives within
  // `timeout`.
  absl::Status Open(const v1::InferenceOpen& open, absl::Duration timeout);

  // Sends hidden states [batch, new_tokens, hidden] for `position` and
  // returns the node's output. Errors as Open.
  absl::StatusOr<StepOutput> Step(const at::Tensor& hidden, int64_t position,
                                  absl::Duration timeout);

  // The two halves of Step. Send starts writing the step and returns at
  // once. It asks the node to push its output to `push_to`, the sessions
  // of the following hops, nearest first (empty for none). Receive waits
  // for the reply to the step sent last, or, when the previous node pushed
  // this hop's step, for the reply to that.
  absl::Status Send(const at::Tensor& hidden, int64_t position,
                    const std::vector<v1::PushTarget>& push_to);
  absl::StatusOr<StepOutput> Receive(absl::Duration timeout);

  // Cancels the stream at once, for a stream whose state is unknown.
  void Abort();

  // Half-closes the stream and collects the node's status, so that the node
  // frees the session at once. A node that does not finish within 5 s, or a
  // stream that failed, is cancelled instead. Idempotent.
  void Close();

  const scheduler::RouteHop& hop() const { return hop_; }

 private:
  using Clock = std::chrono::system_clock;

  // Writes request_ and reads response_ within `timeout`. On failure it
  // collects the node's status, so that the error gives the reason.
  absl::Status Exchange(absl::Duration timeout);

  // Reads response_, and waits for it and any write in flight, within
  // `timeout`. Errors as Exchange.
  absl::Status AwaitReply(absl::Duration timeout);

  // Fails when the stream already failed or was closed.
  absl::Status CheckUsable() const;

  // Waits until every started operation is back from the queue, or until
  // `deadline`. Returns false at the deadline. Sets operation_failed_ when
  // an operation came back not ok.
  bool AwaitPending(Clock::time_point deadline);

  // Cancels the call and waits for its operations, which then return soon.
  void Cancel();

  const scheduler::RouteHop hop_;
  const std::unique_ptr<v1::BlockService::Stub> stub_;

  // Declared before the stream, which must be destroyed first.
  grpc::CompletionQueue queue_;
  grpc::ClientContext context_;
  std::unique_ptr<
      grpc::ClientAsyncReaderWriter<v1::InferenceRequest, v1::InferenceResponse>>
      stream_;

  v1::InferenceRequest request_;
  v1::InferenceResponse response_;
  grpc::Status finish_status_;
  // Encoding of the hidden states that Step sends.
  v1::Compression compression_ = v1::COMPRESSION_NONE;

  // Operations started and not yet returned by queue_.
  int pending_ = 0;
  bool operation_failed_ = false;
  bool failed_ = false;
  bool closed_ = false;
};

}  // namespace pollen::client
