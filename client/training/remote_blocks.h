// Autograd through the swarm: the blocks of a model run on remote nodes with
// the Forward and Backward RPCs, while the client keeps every trainable
// tensor.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/remote_chain.h"
#include "client/training/adapter_set.h"
#include "pollen/v1/pollen.pb.h"
#include "scheduler/route.h"

namespace pollen::client {

class SwarmClient;

struct RemoteBlocksOptions {
  std::string model_id;
  int num_blocks = 0;
  // How long to wait for nodes covering every block.
  absl::Duration discovery_wait = absl::Seconds(30);
  // Deadline of one Forward or Backward call to one node.
  absl::Duration call_timeout = absl::Seconds(120);
  // Replacement routes tried for one hop before the pass fails.
  int max_failovers = 8;
  // Seeds the sampling of routes.
  uint64_t seed = 0;
  // Encoding of the hidden states and output gradients this client sends,
  // and of the ones it requests from the nodes (ForwardRequest.compression).
  v1::Compression compression = v1::COMPRESSION_NONE;
};

// Runs blocks [0, num_blocks) through the swarm. Each pass samples a route
// with scheduler::SampleThroughputRoute, sends one ForwardRequest per hop
// and keeps each hop's inputs; Backward replays the hops in reverse with
// BackwardRequests. A node that fails is banned through the SwarmClient, and
// its blocks move to other nodes. During backward, a replacement route first
// recomputes its own hop inputs with Forward calls.
//
// Not thread-safe: one pass at a time.
class RemoteBlocks {
 public:
  // `swarm` must outlive this object.
  RemoteBlocks(SwarmClient& swarm, RemoteBlocksOptions options);

  // Runs every block on `hidden` [batch, seq, hidden] with `adapters` and
  // returns the outputs [batch, seq, hidden]. The result is differentiable,
  // so loss.backward() sends the gradients back through the swarm into
  // `hidden` and the adapters' tensors. `adapters` must stay alive until that backward has run. Throws
  // c10::Error when the swarm cannot complete the pass, as
  // libtorch ops do; callers wrap it in CatchTorchErrors.
  at::Tensor Run(const at::Tensor& hidden, const AdapterSet& adapters);

  // Hops replaced after a node failure so far.
  int failovers() const { return failovers_; }
  // The hops of the latest forward pass, in order.
  const std::vector<scheduler::RouteHop>& last_route() const {
    return last_route_;
  }

  // One pass without autograd: the outputs and, in `hop_inputs`, each hop's
  // route entry and input. Exposed for the autograd function.
  struct HopInput {
    scheduler::RouteHop hop;
    at::Tensor input;  // [batch, seq, hidden], float32 on the CPU
  };
  absl::StatusOr<at::Tensor> ForwardPass(const at::Tensor& hidden,
                                         const AdapterSet& adapters, int from,
                                         int to,
                                         std::vector<HopInput>* hop_inputs);

  // Gradients of one backward pass.
  struct Gradients {
    at::Tensor grad_inputs;  // [batch, seq, hidden]
    // Same order and shapes as AdapterSet::Parameters().
    std::vector<at::Tensor> grad_parameters;
  };
  absl::StatusOr<Gradients> BackwardPass(
      const std::vector<HopInput>& hop_inputs, const AdapterSet& adapters,
      const at::Tensor& grad_outputs);

  // Stores the hop inputs of one forward pass until its backward takes
  // them, and returns their id.
  int64_t KeepPass(std::vector<HopInput> hop_inputs);
  // Removes and returns the hop inputs stored under `id`, or an empty
  // vector when `id` is unknown.
  std::vector<HopInput> TakePass(int64_t id);

 private:
  absl::StatusOr<std::vector<scheduler::RouteHop>> SampleRoute(int from,
                                                               int to);
  absl::StatusOr<v1::ForwardRequest> MakeRequest(
      const scheduler::RouteHop& hop, const at::Tensor& input,
      const AdapterSet& adapters) const;
  // Sends one request as chunks to the Forward RPC (or Backward when
  // `backward` is true) of `hop` and parses the reply into `response`.
  absl::Status Call(const scheduler::RouteHop& hop, bool backward,
                    const google::protobuf::MessageLite& request,
                    google::protobuf::MessageLite* response);
  // Adds the gradients of one hop's response into `gradients`.
  absl::Status AccumulateGradients(const v1::BackwardResponse& response,
                                   const AdapterSet& adapters,
                                   Gradients* gradients) const;
  absl::Status BackwardHop(const HopInput& hop_input,
                           const AdapterSet& adapters,
                           const at::Tensor& grad_outputs,
                           Gradients* gradients);

  SwarmClient& swarm_;
  const RemoteBlocksOptions options_;
  ChannelPool channels_;
  std::mt19937_64 rng_;
  int failovers_ = 0;
  std::vector<scheduler::RouteHop> last_route_;
  // Hop inputs of forward passes whose backward has not run yet.
  // NOTE: a pass whose graph is dropped without backward stays here until
  // this object is destroyed.
  std::map<int64_t, std::vector<HopInput>> passes_;
  int64_t next_pass_id_ = 0;
};

}  // namespace pollen::client
