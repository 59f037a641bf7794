// An Inference session opened over a plain synchronous gRPC stream, for
// tests that drive a node's protocol message by message.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::testing {

struct RawSession {
  std::unique_ptr<v1::BlockService::Stub> stub;
  grpc::ClientContext context;
  std::unique_ptr<
      grpc::ClientReaderWriter<v1::InferenceRequest, v1::InferenceResponse>>
      stream;
  std::string id;
};

// Opens session `id` of `max_length` positions for blocks [start, end) of
// `model_id` on the node at `address`, with a deadline of 60 s for the
// whole stream, and reads the reply to the open. Fails the current test
// when the node does not reply.
std::unique_ptr<RawSession> OpenRawSession(const std::string& address,
                                           const std::string& model_id,
                                           const std::string& id, int start,
                                           int end, int max_length = 16);

}  // namespace pollen::testing
