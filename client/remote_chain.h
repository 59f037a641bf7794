// An inference session that runs through a chain of nodes, one gRPC
// Inference stream per hop, and survives the failure of any node.
//
// The chain keeps, for every hop, the hidden states it has sent. When a
// node fails (or announces that it is draining), the chain requests other
// nodes covering that hop's blocks, replays the kept inputs so that they
// rebuild the KV cache, and carries on. Because the replacements compute the
// same function of the same inputs, the outputs are the ones a chain with no
// failure would have produced.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/hop_stream.h"
#include "common/channel_pool.h"
#include "pollen/v1/pollen.grpc.pb.h"
#include "scheduler/route.h"

namespace pollen::client {

// Finds nodes for blocks [start, end) that are not in `excluded`. With
// `wait_for_nodes` false it looks once and does not wait for more nodes to
// appear.
using RerouteFunction = std::function<absl::StatusOr<std::vector<scheduler::RouteHop>>(
    int start, int end, const std::set<std::string>& excluded,
    bool wait_for_nodes)>;

struct ChainOptions {
  std::string model_id;
  int64_t batch_size = 1;
  // Positions the session may hold on every node.
  int64_t max_length = 0;
  // Deadline for opening a hop and for each step through one hop.
  absl::Duration step_timeout = absl::Seconds(60);
  // Replaces failed or draining hops; without it a failure ends the session.
  RerouteFunction reroute;
  // Told about every node that failed a request, e.g. to ban it.
  std::function<void(const std::string& node_id)> on_node_failure;
  // Replacements tried for one step before giving up.
  int max_failovers_per_step = 8;
  // Per-block LoRA weights and deep prompts; each hop's InferenceOpen
  // carries the entries of its blocks, also when a failover reopens it.
  std::vector<v1::BlockAdapters> adapters;
  // Server-to-server push: each node sends its output straight to the next
  // node, the client only sends the first hop's input, and the last hop
  // replies with every node's output. After a push fails, the session
  // relays.
  bool push = false;
  // Encoding of the hidden states sent to and from every hop. The lossy
  // ones cut the bytes per step to about a half (fp16, bf16) or a quarter
  // (int8) of float32 and may change the generated tokens.
  v1::Compression compression = v1::COMPRESSION_NONE;
};

// True for errors after which another node may succeed: the node is gone,
// timed out, lost the session, or is full.
bool IsFailoverError(const absl::Status& status);

// Not thread-safe: one step at a time.
class InferenceChain {
 public:
  // Opens a session on every hop of `route`, replacing hops that fail to
  // open.
  static absl::StatusOr<std::unique_ptr<InferenceChain>> Open(
      ChannelPool& channels, const std::vector<scheduler::RouteHop>& route,
      const ChainOptions& options);
  ~InferenceChain();

  // Runs hidden states [batch, new_tokens, hidden] through every hop and
  // returns the last hop's output, same shape.
  absl::StatusOr<at::Tensor> Step(const at::Tensor& hidden);

  // Positions each node holds.
  int64_t position() const { return position_; }
  // The hops in use now; failovers change it.
  std::vector<scheduler::RouteHop> route() const;
  const std::string& session_id() const { return session_id_; }
  // Hops replaced so far because a node failed or drained.
  int failovers() const { return failovers_; }

  // Closes every stream; the nodes free their caches.
  void Close();

 private:
  // StepGroup sends the steps of several chains together and hands each
  // chain the outcome (FinishStep).
  friend class StepGroup;

  // A hop of the chain: its stream and every input it has accepted.
  struct Hop {
    scheduler::RouteHop route_hop;
    std::unique_ptr<HopStream> stream;  // null until opened
    std::string stream_session_id;      // the session id the stream opened
    // Hidden states sent to this hop: one [batch, tokens, hidden] tensor
    // per completed step, or one for a replay. Together they cover
    // positions [0, position_).
    std::vector<at::Tensor> inputs;
    bool draining = false;
  };

  // The outcome of a step's first attempt through the hops, as RunPushed
  // (pushed) or RunHops (relayed, from hop 0) leave it.
  struct Attempt {
    bool pushed = false;
    // Pushed: as RunPushed returns. Relayed: hops_.size() when the step
    // went through, the hop's error otherwise.
    absl::StatusOr<size_t> resume;
    // The last output, or the input of the hop named by `failed`.
    at::Tensor current;
    size_t failed = 0;
  };

  // A reply to a pushed step and the hop that sent it.
  struct PushReply {
    size_t hop = 0;
    HopStream::StepOutput output;
  };

  // Whether the next step may be pushed: push is on and has not failed,
  // and every hop is open.
  bool CanPush() const;
  // Runs a step of `hidden`: the first attempt when `attempt` is empty, or
  // goes on from `attempt`. Then fails over, relays after a failed push,
  // and moves off draining nodes as needed, and returns the last output.
  absl::StatusOr<at::Tensor> FinishStep(const at::Tensor& hidden,
                                        std::optional<Attempt> attempt);
  // The sessions of hops 1 and later, for a push from hop 0.
  std::vector<v1::PushTarget> PushTargets() const;
  // Checks every hop's stream for the reply to the pushed step of
  // `new_tokens` at position_, waiting until `until` on hop `wait_hop` only
  // (none when it is past the last hop). Returns nullopt when no reply
  // came; on a stream's failure, `failed` names its hop.
  absl::StatusOr<std::optional<PushReply>> PollPushed(int64_t new_tokens,
                                                      size_t wait_hop,
                                                      absl::Time until,
                                                      size_t* failed);
  // Takes the reply of hop `replied` to a pushed step of input `*hidden`:
  // keeps every hop's input, sets `*hidden` to the output and returns as
  // RunPushed.
  absl::StatusOr<size_t> AcceptPushed(HopStream::StepOutput output,
                                      size_t replied, at::Tensor* hidden,
                                      size_t* failed);

  InferenceChain(ChannelPool& channels, ChainOptions options,
                 std::string session_id);

  // Opens hop `index` if it has no stream yet.
  absl::Status EnsureOpen(size_t index);
  // The id of the next stream this chain opens, unique on every node.
  std::string NextStreamId();
  // Runs `*hidden` through hops [first, end) one at a time, the client
  // carrying each output to the next node, so `*hidden` becomes each hop's
  // output in turn. On failure it is the input of the hop that failed,
  // whose index goes to `failed`.
  absl::Status RunHops(size_t first, at::Tensor* hidden, size_t* failed);
  // Sends `*hidden` to the first hop with every later hop as push targets,
  // and waits for the last hop's reply while it watches the others for a
  // node that could not push. Keeps the input of every hop that ran the
  // step. Returns hops_.size() when the step went through, with `*hidden`
  // the last output. When hop i could not push, returns i + 1 with
  // `*hidden` hop i's output. On failure, `failed` names the hop whose
  // stream failed (the last hop when no node replied in time).
  absl::StatusOr<size_t> RunPushed(at::Tensor* hidden, size_t* failed);
  // Restarts every hop but `failed` from its kept inputs, from the last to
  // the first, and returns the index `failed` has afterwards: a restart
  // that replaces a hop before it with several shifts it.
  absl::StatusOr<size_t> RestartAllBut(size_t failed);
  // Opens a new session on the node of hop `index` and replays its kept
  // inputs, for a hop that may or may not have run the current step.
  // Replaces the hop with other nodes when its node fails.
  absl::Status RestartHop(size_t index);
  // Replaces hop `index` with nodes found by options_.reroute (one or more
  // hops over the same blocks), replaying its kept inputs into them.
  // `cause` is why the hop must go. After a node rejected the session for
  // lack of cache (RESOURCE_EXHAUSTED), the route search does not wait for
  // new nodes, and a failed search returns RESOURCE_EXHAUSTED.
  absl::Status ReplaceHop(size_t index, const absl::Status& cause,
                          bool wait_for_nodes = true);
  // Opens `route` and replays `history` [batch, position, hidden] through
  // it. Returns the new hops, or the first error with the node that failed
  // in `failed_node`.
  absl::StatusOr<std::vector<std::unique_ptr<Hop>>> OpenAndReplay(
      const std::vector<scheduler::RouteHop>& route, const at::Tensor& history,
      std::string* failed_node);
  // Moves hops whose node announced draining to nodes that are known now.
  // When none is, the session goes on through the draining node, which
  // serves it until its drain timeout, and looks again after
  // kDrainingRetryInterval.
  void MigrateDrainingHops();
  static constexpr absl::Duration kDrainingRetryInterval = absl::Seconds(5);
  void RecordFailure(const std::string& node_id);

  ChannelPool& channels_;
  const ChainOptions options_;
  const std::string session_id_;
  std::vector<std::unique_ptr<Hop>> hops_;
  // Nodes this session stopped using: failed or draining.
  std::set<std::string> excluded_nodes_;
  int64_t position_ = 0;
  int failovers_ = 0;
  // No move off a draining node is tried before this time.
  absl::Time next_drain_move_ = absl::InfinitePast();
  // Set after a push failed, so that the session relays from then on.
  bool push_stopped_ = false;
  int streams_opened_ = 0;
};

// Returns a random 128-bit session id as hex.
std::string NewSessionId();

}  // namespace pollen::client
