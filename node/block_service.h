// The gRPC BlockService of a node: Inference streams and Info.
//
// This layer converts between protobuf and domain objects and between
// absl::Status and grpc::Status; the work happens in BlockSpan and
// SessionManager.
#pragma once

#include <atomic>
#include <string>

#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

class BlockSpan;
class SessionManager;

// What the service needs from the node. Everything it refers to must outlive
// the service.
struct ServiceContext {
  std::string model_id;
  std::string node_id;
  std::string public_name;
  const BlockSpan* span = nullptr;
  SessionManager* sessions = nullptr;
  // Set when the node is shutting down: new sessions get UNAVAILABLE, open
  // ones go on until their streams end.
  std::atomic<bool> draining{false};
};

// Thread-safe; gRPC calls its methods from its own threads.
class BlockServiceImpl final : public v1::BlockService::CallbackService {
 public:
  explicit BlockServiceImpl(ServiceContext* context) : context_(context) {}

  grpc::ServerBidiReactor<v1::InferenceRequest, v1::InferenceResponse>*
  Inference(grpc::CallbackServerContext* call) override;

  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* call,
                                 const v1::InfoRequest* request,
                                 v1::InfoResponse* response) override;

 private:
  ServiceContext* const context_;
};

// Pollen's version string, as reported by Info and announced records.
const char* PollenVersion();

}  // namespace pollen::node
