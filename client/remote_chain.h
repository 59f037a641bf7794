// An inference session that runs through a chain of nodes, one gRPC
// Inference stream per hop.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "scheduler/route.h"

namespace pollen::client {

// Creates and reuses one channel per node address. Thread-safe.
class ChannelPool {
 public:
  std::shared_ptr<grpc::Channel> Get(const std::string& address);

 private:
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_
      ABSL_GUARDED_BY(mu_);
};

struct ChainOptions {
  std::string model_id;
  int64_t batch_size = 1;
  // Positions the session may hold on every node.
  int64_t max_length = 0;
  // Deadline for opening a hop and for each step through one hop.
  absl::Duration step_timeout = absl::Seconds(60);
};

// Not thread-safe: one step at a time.
class InferenceChain {
 public:
  // Opens a session on every hop of `route`; fails with the first hop's
  // error, naming the node.
  static absl::StatusOr<std::unique_ptr<InferenceChain>> Open(
      ChannelPool& channels, const std::vector<scheduler::RouteHop>& route,
      const ChainOptions& options);
  ~InferenceChain();

  // Runs hidden states [batch, new_tokens, hidden] through every hop and
  // returns the last hop's output, same shape.
  absl::StatusOr<at::Tensor> Step(const at::Tensor& hidden);

  // Positions each node holds.
  int64_t position() const { return position_; }
  const std::vector<scheduler::RouteHop>& route() const { return route_; }
  const std::string& session_id() const { return session_id_; }

  // Closes every stream; the nodes free their caches.
  void Close();

  class HopStream;

 private:
  InferenceChain(std::vector<scheduler::RouteHop> route, ChainOptions options,
                 std::string session_id);

  const std::vector<scheduler::RouteHop> route_;
  const ChainOptions options_;
  const std::string session_id_;
  std::vector<std::unique_ptr<HopStream>> hops_;
  int64_t position_ = 0;
};

// Returns a random 128-bit session id as hex.
std::string NewSessionId();

}  // namespace pollen::client
