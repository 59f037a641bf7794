// One Inference stream from a client to one node.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
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
// With server-to-server push, a node replies only to the steps that reach
// the end of the route, and to the steps it could not push. A read therefore
// stays pending across steps on the hops in between, and a reply for
// another step than the one awaited (a push that failed after the client
// moved on) is dropped.
//
// Thread-compatible: one call at a time. After a failure every later call
// fails at once; the chain replaces the hop.
class HopStream {
 public:
  // The output of one node of a pushed step.
  struct TrailEntry {
    at::Tensor hidden;  // [batch, new_tokens, hidden], owning its memory
    bool draining = false;
  };

  struct StepOutput {
    at::Tensor hidden;  // [batch, new_tokens, hidden], owning its memory
    bool draining = false;
    // For a step that reached this node by push, and from a node that
    // could not push: the outputs of the earlier nodes, in route order.
    std::vector<TrailEntry> trail;
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

  // The halves of Step. Send starts writing the step and returns at once.
  // The node pushes its output to `push_to`, the sessions of the following
  // hops, nearest first (empty for none).
  absl::Status Send(const at::Tensor& hidden, int64_t position,
                    const std::vector<v1::PushTarget>& push_to);

  // Waits for the reply that ends at `end_position` (the step's position
  // plus its new tokens). Errors as Open.
  absl::StatusOr<StepOutput> Receive(int64_t end_position,
                                     absl::Duration timeout);

  // Waits until `deadline` for that reply. Returns nullopt at the deadline
  // and keeps waiting in the background, so that a later call finds the
  // reply. Errors as Open, except that the deadline fails nothing.
  absl::StatusOr<std::optional<StepOutput>> Poll(int64_t end_position,
                                                 absl::Time deadline);

  // Cancels the stream at once, for a stream whose state is unknown.
  void Abort();

  // Half-closes the stream and collects the node's status, so that the node
  // frees the session at once. A node that does not finish within 5 s, or a
  // stream that failed, is cancelled instead. Idempotent.
  void Close();

  const scheduler::RouteHop& hop() const { return hop_; }

 private:
  using Clock = std::chrono::system_clock;

  // Takes completed operations from the queue until `done()` returns true
  // or `deadline` passes. Returns false at the deadline.
  template <typename Done>
  bool Drain(Clock::time_point deadline, Done done);

  // Fails the stream after a failed read: collects the node's status, so
  // that the error gives the reason.
  absl::Status FailFromStatus();

  // Fails when the stream already failed or was closed.
  absl::Status CheckUsable() const;

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
  bool write_pending_ = false;
  bool read_pending_ = false;
  int other_pending_ = 0;  // WritesDone and Finish calls
  // A read that returned and was not consumed yet, and whether it got a
  // message.
  bool read_returned_ = false;
  bool read_ok_ = false;
  bool failed_ = false;
  bool closed_ = false;
};

// Returns "node ID at ADDRESS (blocks A:B)", with the first 12 characters
// of the node id, for messages and logs.
std::string DescribeHop(const scheduler::RouteHop& hop);

// Copies the output of a step out of `response`, which came from `hop`.
// Errors about its tensors name the hop. That description is built only
// on error, since a grouped step decodes several tensors per session.
absl::StatusOr<HopStream::StepOutput> StepOutputFromResponse(
    const v1::InferenceResponse& response, const scheduler::RouteHop& hop);

}  // namespace pollen::client
