// Steps of several sessions of one client, sent together: each node gets
// the steps of all of them in one message and returns their outputs in one
// message, over a SessionSteps stream, instead of one message each way per
// session. The node runs them in one batched pass either way; the saving
// is the per-message cost, which dominates small models.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/remote_chain.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::client {

// Runs one step of several InferenceChains at a time. Chains that share a
// route travel together. With push, one message to the route's first node
// carries every chain's step, and the last node returns every output in one
// message. Relayed, each hop gets one message and returns one. Chains on
// different routes form one group per route, and the groups run one after
// another. A chain alone on its route, or with a hop not open, steps on
// its own. When anything goes wrong for one chain (a node rejects its
// step, or its own stream fails), that chain recovers as its Step would,
// and the others go on.
//
// The group keeps one SessionSteps stream to each node it has sent to, and
// polls them from the calling thread. Not thread-safe: one Step at a time,
// and the chains must not step elsewhere meanwhile.
class StepGroup {
 public:
  StepGroup();
  // Closes the streams.
  ~StepGroup();

  StepGroup(const StepGroup&) = delete;
  StepGroup& operator=(const StepGroup&) = delete;

  // Runs hidden[i] [batch, new_tokens, hidden] through chains[i] for every
  // i, and returns each chain's output, or its error, as its Step would.
  // The two vectors must have the same size, and the chains must be
  // distinct and not null (INVALID_ARGUMENT for all otherwise).
  std::vector<absl::StatusOr<at::Tensor>> Step(
      const std::vector<InferenceChain*>& chains,
      const std::vector<at::Tensor>& hidden);

 private:
  // One SessionSteps stream to one node.
  struct Link;
  // A chain's part in one grouped step.
  struct Member;

  // Returns the stream to `address`, opening it first when there is none
  // or the last one failed.
  absl::StatusOr<Link*> LinkTo(ChannelPool& channels, const std::string& address);

  // Sends each member's step to its first hop with push targets, and
  // collects each member's first attempt.
  void RunPushed(std::vector<Member>& members);

  // Sends the members' steps to their hops one at a time, and collects
  // each member's first attempt.
  void RunRelayed(std::vector<Member>& members);

  // Writes `link`'s request, once the previous message is out. Fails the
  // link when that takes more than a few seconds.
  absl::Status Send(Link& link);

  // Waits until `until` for messages from `links`, and hands each reply to
  // `on_reply` with its link. Returns when every member in `pending` has
  // an attempt, at `until`, or when a link fails (which fails its
  // members' attempts through `on_link_failure`).
  template <typename OnReply, typename OnLinkFailure>
  void Receive(const std::vector<Link*>& links, absl::Time until,
               const std::vector<Member*>& pending, OnReply on_reply,
               OnLinkFailure on_link_failure);

  // Takes one completion from the queue, waiting until `deadline`.
  // Returns false at the deadline.
  bool NextEvent(absl::Time deadline);

  // Marks `link` failed with the node's status.
  void FailLink(Link& link);

  grpc::CompletionQueue queue_;
  // The usable stream to each node, by address.
  std::map<std::string, std::unique_ptr<Link>> links_;
  // Failed streams, kept until gRPC has returned their operations.
  std::vector<std::unique_ptr<Link>> retired_;
};

}  // namespace pollen::client
