// Server side of the Forward and Backward RPCs: stateless passes for
// training, carried as PayloadChunk streams.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/payload_chunks.h"
#include "node/block_service.h"
#include "node/call_loop.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

// Validates `request` against the node (model id, served blocks, hidden
// states, adapters) and runs blocks [start, end) on it without autograd.
// NOT_FOUND for another model, UNAVAILABLE for blocks this node does not
// serve, INVALID_ARGUMENT for bad shapes or adapters.
absl::StatusOr<v1::ForwardResponse> RunForwardRequest(
    const v1::ForwardRequest& request, const ServiceContext& context);

// As RunForwardRequest, then back-propagates grad_outputs (the shape of the
// outputs) and returns the gradients of the inputs and of every adapter
// tensor sent.
absl::StatusOr<v1::BackwardResponse> RunBackwardRequest(
    const v1::BackwardRequest& request, const ServiceContext& context);

// One Forward or Backward call. Reads chunks until the one marked `last`,
// queues the pass on context->compute, then writes the response chunks one
// at a time. The call loop's thread runs the callbacks and the queue's
// worker runs the pass; at most one read or write is in flight. Deletes
// itself in OnDone.
class TrainingReactor final
    : public ServerStreamReactor<v1::PayloadChunk, v1::PayloadChunk> {
 public:
  enum class Kind { kForward, kBackward };

  // `context` must outlive the reactor.
  TrainingReactor(ServiceContext* context, Kind kind,
                  std::unique_ptr<Call> call);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;

 private:
  // Runs on the compute queue's worker: parses, computes and starts
  // writing, or finishes with the error.
  void Compute(bool cancelled);

  // Parses the request bytes and returns the serialized response.
  absl::StatusOr<std::string> Respond(const std::string& request) const;

  const char* name() const {
    return kind_ == Kind::kForward ? "Forward" : "Backward";
  }

  ServiceContext* const context_;
  const Kind kind_;
  const std::string peer_;
  v1::PayloadChunk chunk_;
  Reassembler reassembler_;
  std::vector<v1::PayloadChunk> out_;
  size_t next_out_ = 0;
};

}  // namespace pollen::node
