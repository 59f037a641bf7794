// Server side of one Inference stream: one session from open to close.
#pragma once

#include <memory>
#include <string>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "node/block_service.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

struct Session;

// Limits on a single request, checked before any work is done.
inline constexpr int kMaxSessionIdLength = 128;

// Reads requests one at a time and writes exactly one response per step, so
// at most one read or write is in flight. Steps run through the session
// manager's StepBatcher, which replies from whichever thread ran the step.
// gRPC runs the other callbacks on its own threads; the reactor deletes
// itself in OnDone, after which the session is closed and its cache freed.
class InferenceReactor final
    : public grpc::ServerBidiReactor<v1::InferenceRequest,
                                     v1::InferenceResponse> {
 public:
  // `context` must outlive the reactor. `peer` names the client in logs.
  InferenceReactor(ServiceContext* context, std::string peer);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;

 private:
  // Fills response_ on success.
  absl::Status HandleOpen(const v1::InferenceOpen& open);

  // Checks `step` and queues it; on success StepDone replies later.
  absl::Status SubmitStep(const v1::InferenceStep& step);

  // Writes the step's output into response_ and replies.
  void StepDone(absl::StatusOr<at::Tensor> output);

  // Writes response_ when `status` is OK, otherwise ends the stream with it.
  void Reply(const absl::Status& status);

  void FinishOnce(const absl::Status& status);

  ServiceContext* const context_;
  const std::string peer_;
  v1::InferenceRequest request_;
  v1::InferenceResponse response_;
  std::shared_ptr<Session> session_;
  bool finished_ = false;
};

}  // namespace pollen::node
