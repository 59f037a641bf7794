#include "client/remote_chain.h"

#include <algorithm>
#include <optional>
#include <random>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_format.h"
#include "client/hop_stream.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"

namespace pollen::client {
namespace {

// The open message for `hop`: the session's limits, and the adapters of
// the hop's blocks.
v1::InferenceOpen MakeOpenMessage(const ChainOptions& options,
                                  const scheduler::RouteHop& hop,
                                  const std::string& session_id) {
  v1::InferenceOpen open;
  open.set_model_id(options.model_id);
  open.mutable_blocks()->set_start(hop.start);
  open.mutable_blocks()->set_end(hop.end);
  open.set_max_length(static_cast<uint32_t>(options.max_length));
  open.set_session_id(session_id);
  open.set_batch_size(static_cast<uint32_t>(options.batch_size));
  open.set_compression(options.compression);
  for (const v1::BlockAdapters& adapter : options.adapters) {
    if (static_cast<int>(adapter.block()) >= hop.start &&
        static_cast<int>(adapter.block()) < hop.end) {
      *open.add_adapters() = adapter;
    }
  }
  return open;
}

// How often a pushed step's wait for the last node pauses to check the
// nodes in between for one that could not push.
constexpr absl::Duration kPushWatchInterval = absl::Milliseconds(10);

}  // namespace

bool IsFailoverError(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
      return true;
    default:
      return false;
  }
}

std::string NewSessionId() {
  std::random_device device;
  std::mt19937_64 generator((static_cast<uint64_t>(device()) << 32) ^ device());
  return absl::StrFormat("%016x%016x", generator(), generator());
}

InferenceChain::InferenceChain(ChannelPool& channels, ChainOptions options,
                               std::string session_id)
    : channels_(channels),
      options_(std::move(options)),
      session_id_(std::move(session_id)) {}

InferenceChain::~InferenceChain() { Close(); }

absl::StatusOr<std::unique_ptr<InferenceChain>> InferenceChain::Open(
    ChannelPool& channels, const std::vector<scheduler::RouteHop>& route,
    const ChainOptions& options) {
  if (route.empty()) {
    return absl::InvalidArgumentError("cannot open a session on an empty route");
  }
  std::unique_ptr<InferenceChain> chain(
      new InferenceChain(channels, options, NewSessionId()));
  for (const scheduler::RouteHop& route_hop : route) {
    auto hop = std::make_unique<Hop>();
    hop->route_hop = route_hop;
    chain->hops_.push_back(std::move(hop));
  }

  for (size_t i = 0; i < chain->hops_.size(); ++i) {
    absl::Status opened = chain->EnsureOpen(i);
    // ReplaceHop tries several routes itself and opens the hops it puts in
    // place, so one call settles hop i. When it finds no route after the
    // discovery wait, trying again would only wait again.
    if (!opened.ok() && IsFailoverError(opened)) {
      opened = chain->ReplaceHop(i, opened);
    }
    POLLEN_RETURN_IF_ERROR(opened);
  }
  POLLEN_LOG_DEBUG("session {} open through {} nodes", chain->session_id_,
                   chain->hops_.size());
  return chain;
}

std::vector<scheduler::RouteHop> InferenceChain::route() const {
  std::vector<scheduler::RouteHop> route;
  for (const auto& hop : hops_) route.push_back(hop->route_hop);
  return route;
}

void InferenceChain::RecordFailure(const std::string& node_id) {
  excluded_nodes_.insert(node_id);
  if (options_.on_node_failure) options_.on_node_failure(node_id);
}

std::string InferenceChain::NextStreamId() {
  return absl::StrCat(session_id_, ".", streams_opened_++);
}

absl::Status InferenceChain::EnsureOpen(size_t index) {
  Hop& hop = *hops_[index];
  if (hop.stream != nullptr) return absl::OkStatus();
  auto stream = std::make_unique<HopStream>(
      hop.route_hop, channels_.Get(hop.route_hop.server.address));
  const std::string stream_session_id = NextStreamId();
  const absl::Status opened = stream->Open(
      MakeOpenMessage(options_, hop.route_hop, stream_session_id),
      options_.step_timeout);
  if (!opened.ok()) {
    RecordFailure(hop.route_hop.server.node_id);
    return opened;
  }
  hop.stream = std::move(stream);
  hop.stream_session_id = stream_session_id;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::unique_ptr<InferenceChain::Hop>>>
InferenceChain::OpenAndReplay(const std::vector<scheduler::RouteHop>& route,
                              const at::Tensor& history,
                              std::string* failed_node) {
  std::vector<std::unique_ptr<Hop>> hops;
  at::Tensor current = history;
  for (size_t i = 0; i < route.size(); ++i) {
    auto hop = std::make_unique<Hop>();
    hop->route_hop = route[i];
    hop->stream = std::make_unique<HopStream>(
        route[i], channels_.Get(route[i].server.address));
    hop->stream_session_id = NextStreamId();
    *failed_node = route[i].server.node_id;
    POLLEN_RETURN_IF_ERROR(hop->stream->Open(
        MakeOpenMessage(options_, route[i], hop->stream_session_id),
        options_.step_timeout));

    // Replaying the whole history as one step rebuilds the node's cache.
    if (current.defined()) {
      POLLEN_ASSIGN_OR_RETURN(
          HopStream::StepOutput output,
          hop->stream->Step(current, 0, options_.step_timeout));
      hop->inputs.push_back(current);
      hop->draining = output.draining;
      current = output.hidden;
    }
    hops.push_back(std::move(hop));
  }
  failed_node->clear();
  return hops;
}

absl::Status InferenceChain::ReplaceHop(size_t index, const absl::Status& cause,
                                        bool wait_for_nodes) {
  if (!options_.reroute) {
    return absl::Status(cause.code(),
                        absl::StrCat("no way to replace a failed node: ",
                                     cause.message()));
  }
  Hop& old_hop = *hops_[index];
  const int start = old_hop.route_hop.start;
  const int end = old_hop.route_hop.end;
  const at::Tensor history =
      old_hop.inputs.empty() ? at::Tensor() : at::cat(old_hop.inputs, 1);

  absl::Status last_error = cause;
  for (int attempt = 0; attempt < options_.max_failovers_per_step; ++attempt) {
    // A full node frees cache only as its sessions end, which new nodes
    // showing up in the DHT would not hasten.
    const bool full = absl::IsResourceExhausted(last_error);
    POLLEN_LOG_INFO("session {}: looking for nodes to replace {} (attempt {})",
                    session_id_, DescribeHop(old_hop.route_hop), attempt + 1);
    auto route = options_.reroute(start, end, excluded_nodes_,
                                  wait_for_nodes && !full);
    if (!route.ok()) {
      if (full) {
        return absl::ResourceExhaustedError(absl::StrCat(
            last_error.message(), "; no other node for blocks ", start, ":",
            end, " has room: ", route.status().message()));
      }
      return absl::Status(
          route.status().code(),
          absl::StrCat("cannot replace ", DescribeHop(old_hop.route_hop), " (",
                       last_error.message(), "): ", route.status().message()));
    }
    std::vector<std::string> nodes;
    for (const scheduler::RouteHop& hop : *route) nodes.push_back(DescribeHop(hop));
    POLLEN_LOG_INFO("session {}: opening {} and replaying {} positions",
                    session_id_, absl::StrJoin(nodes, ", "),
                    history.defined() ? history.size(1) : 0);
    std::string failed_node;
    auto replacement = OpenAndReplay(*route, history, &failed_node);
    if (replacement.ok()) {
      POLLEN_LOG_INFO("session {}: replaced {} with {} node(s) after: {}",
                      session_id_, DescribeHop(old_hop.route_hop),
                      route->size(), std::string(cause.message()));
      ++failovers_;
      if (old_hop.stream) old_hop.stream->Close();
      hops_.erase(hops_.begin() + index);
      hops_.insert(hops_.begin() + index,
                   std::make_move_iterator(replacement->begin()),
                   std::make_move_iterator(replacement->end()));
      return absl::OkStatus();
    }
    last_error = replacement.status();
    POLLEN_LOG_WARN("session {}: replacement for blocks {}:{} failed, retrying: {}",
                    session_id_, start, end, last_error.ToString());
    if (!IsFailoverError(last_error)) return last_error;
    if (!failed_node.empty()) RecordFailure(failed_node);
  }
  return last_error;
}

absl::Status InferenceChain::RestartHop(size_t index) {
  Hop& hop = *hops_[index];
  if (hop.stream) hop.stream->Abort();
  const at::Tensor history =
      hop.inputs.empty() ? at::Tensor() : at::cat(hop.inputs, 1);
  std::string failed_node;
  auto restarted = OpenAndReplay({hop.route_hop}, history, &failed_node);
  if (restarted.ok()) {
    POLLEN_LOG_INFO("session {}: restarted {} from {} kept positions",
                    session_id_, DescribeHop(hop.route_hop), position_);
    hops_[index] = std::move(restarted->front());
    return absl::OkStatus();
  }
  if (!IsFailoverError(restarted.status())) return restarted.status();
  if (!failed_node.empty()) RecordFailure(failed_node);
  return ReplaceHop(index, restarted.status());
}

absl::Status InferenceChain::RunHops(size_t first, at::Tensor* hidden,
                                     size_t* failed) {
  for (size_t i = first; i < hops_.size(); ++i) {
    *failed = i;
    POLLEN_RETURN_IF_ERROR(EnsureOpen(i));
    Hop& hop = *hops_[i];
    absl::StatusOr<HopStream::StepOutput> output =
        hop.stream->Step(*hidden, position_, options_.step_timeout);
    if (!output.ok()) {
      RecordFailure(hop.route_hop.server.node_id);
      return output.status();
    }
    hop.inputs.push_back(*hidden);
    hop.draining = hop.draining || output->draining;
    *hidden = std::move(output->hidden);
  }
  return absl::OkStatus();
}

std::vector<v1::PushTarget> InferenceChain::PushTargets() const {
  std::vector<v1::PushTarget> push_to;
  for (size_t j = 1; j < hops_.size(); ++j) {
    v1::PushTarget& target = push_to.emplace_back();
    target.set_address(hops_[j]->route_hop.server.address);
    target.set_session_id(hops_[j]->stream_session_id);
  }
  return push_to;
}

absl::StatusOr<size_t> InferenceChain::RunPushed(at::Tensor* hidden,
                                                 size_t* failed) {
  *failed = 0;
  const absl::Status sent =
      hops_[0]->stream->Send(*hidden, position_, PushTargets());
  if (!sent.ok()) {
    RecordFailure(hops_[0]->route_hop.server.node_id);
    return sent;
  }

  // The last node replies to a step that went all the way, and a node in
  // between replies only when it could not push. The wait is cut into
  // short slices so the others are checked now and then.
  const size_t last = hops_.size() - 1;
  const absl::Time deadline = absl::Now() + options_.step_timeout;
  while (true) {
    const absl::Time until =
        std::min(deadline, absl::Now() + kPushWatchInterval);
    absl::StatusOr<std::optional<PushReply>> polled =
        PollPushed(hidden->size(1), last, until, failed);
    if (!polled.ok()) return polled.status();
    if (polled->has_value()) {
      return AcceptPushed(std::move((*polled)->output), (*polled)->hop, hidden,
                          failed);
    }
    if (absl::Now() >= deadline) {
      *failed = last;
      return absl::DeadlineExceededError(absl::StrCat(
          "no node replied to the pushed step at position ", position_,
          " within ", absl::FormatDuration(options_.step_timeout)));
    }
  }
}

absl::StatusOr<std::optional<InferenceChain::PushReply>>
InferenceChain::PollPushed(int64_t new_tokens, size_t wait_hop,
                           absl::Time until, size_t* failed) {
  const int64_t end = position_ + new_tokens;
  for (size_t j = hops_.size(); j-- > 0;) {
    *failed = j;
    // The others are only checked: a deadline of now returns at once
    // (gRPC reads a time before 1970 as no deadline at all).
    absl::StatusOr<std::optional<HopStream::StepOutput>> polled =
        hops_[j]->stream->Poll(end, j == wait_hop ? until : absl::Now());
    if (!polled.ok()) {
      RecordFailure(hops_[j]->route_hop.server.node_id);
      return polled.status();
    }
    if (polled->has_value()) return PushReply{j, std::move(**polled)};
  }
  return std::nullopt;
}

absl::StatusOr<size_t> InferenceChain::AcceptPushed(HopStream::StepOutput output,
                                                    size_t replied,
                                                    at::Tensor* hidden,
                                                    size_t* failed) {
  // The trail contains the outputs of the hops before the one that replied.
  if (output.trail.size() != replied) {
    *failed = replied;
    return absl::InternalError(absl::StrCat(
        DescribeHop(hops_[replied]->route_hop), " replied with ",
        output.trail.size(), " trail entries, expected ", replied));
  }
  hops_[0]->inputs.push_back(*hidden);
  for (size_t k = 0; k < replied; ++k) {
    hops_[k]->draining = hops_[k]->draining || output.trail[k].draining;
    hops_[k + 1]->inputs.push_back(std::move(output.trail[k].hidden));
  }
  hops_[replied]->draining = hops_[replied]->draining || output.draining;
  *hidden = std::move(output.hidden);
  return replied == hops_.size() - 1 ? hops_.size() : replied + 1;
}

absl::StatusOr<size_t> InferenceChain::RestartAllBut(size_t failed) {
  for (size_t j = hops_.size(); j-- > 0;) {
    if (j == failed) continue;
    const size_t hops_before = hops_.size();
    POLLEN_RETURN_IF_ERROR(RestartHop(j));
    if (j < failed) failed += hops_.size() - hops_before;
  }
  return failed;
}

bool InferenceChain::CanPush() const {
  // A push names the sessions of the later hops, so every hop must be open.
  if (!options_.push || push_stopped_ || hops_.size() < 2) return false;
  for (const auto& hop : hops_) {
    if (hop->stream == nullptr) return false;
  }
  return true;
}

absl::StatusOr<at::Tensor> InferenceChain::Step(const at::Tensor& hidden) {
  return FinishStep(hidden, std::nullopt);
}

absl::StatusOr<at::Tensor> InferenceChain::FinishStep(
    const at::Tensor& hidden, std::optional<Attempt> attempt) {
  bool push = !attempt.has_value() && CanPush();
  at::Tensor current = hidden;
  size_t first = 0;
  int failovers_this_step = 0;
  while (true) {
    size_t failed = first;
    bool pushed = push;
    absl::StatusOr<size_t> resume;
    if (attempt.has_value()) {
      // A StepGroup made the first attempt.
      pushed = attempt->pushed;
      resume = std::move(attempt->resume);
      current = std::move(attempt->current);
      failed = attempt->failed;
      attempt.reset();
    } else if (push) {
      resume = RunPushed(&current, &failed);
    } else {
      const absl::Status ran = RunHops(first, &current, &failed);
      if (ran.ok()) {
        resume = hops_.size();
      } else {
        resume = ran;
      }
    }
    push = false;

    absl::Status status;
    if (pushed) {
      if (resume.ok() && *resume == hops_.size()) break;
      push_stopped_ = true;
      if (resume.ok()) {
        // Hop *resume - 1 could not push. When its push broke after the
        // write, the later hops may have run the step, so they start again
        // from their kept inputs, and the client relays from there on.
        POLLEN_LOG_WARN("session {} at position {}: {} could not push its "
                        "output; relaying from now on",
                        session_id_, position_,
                        DescribeHop(hops_[*resume - 1]->route_hop));
        for (size_t j = hops_.size(); j-- > *resume;) {
          POLLEN_RETURN_IF_ERROR(RestartHop(j));
        }
        first = *resume;
        continue;
      }
      status = resume.status();
    } else {
      if (resume.ok()) break;
      status = resume.status();
    }

    // The hop failed: move its blocks to other nodes and run this step
    // again from the same hop.
    if (!IsFailoverError(status) ||
        ++failovers_this_step > options_.max_failovers_per_step) {
      return status;
    }
    POLLEN_LOG_WARN("session {} at position {}: {}", session_id_, position_,
                    status.ToString());
    if (pushed) {
      // The hops before the failed one ran this step, and the ones after
      // may have, but only the first hop's input is at hand. Every hop goes
      // back to its kept inputs, and the step runs again from the first.
      POLLEN_LOG_WARN("session {}: push stopped; relaying from now on",
                      session_id_);
      POLLEN_ASSIGN_OR_RETURN(failed, RestartAllBut(failed));
      POLLEN_RETURN_IF_ERROR(ReplaceHop(failed, status));
      current = hidden;
      first = 0;
      continue;
    }
    POLLEN_RETURN_IF_ERROR(ReplaceHop(failed, status));
    first = failed;
  }
  position_ += hidden.size(1);
  MigrateDrainingHops();
  return current;
}

void InferenceChain::MigrateDrainingHops() {
  if (absl::Now() < next_drain_move_) return;
  for (size_t i = 0; i < hops_.size(); ++i) {
    if (!hops_[i]->draining) continue;
    // Not a failure: the node asked to be left, so it is only excluded here.
    excluded_nodes_.insert(hops_[i]->route_hop.server.node_id);
    const std::string node = DescribeHop(hops_[i]->route_hop);
    const absl::Status moved =
        ReplaceHop(i, absl::UnavailableError("the node is draining"),
                   /*wait_for_nodes=*/false);
    if (!moved.ok()) {
      // The old node keeps serving until its drain timeout, so the session
      // goes on there rather than wait for a new node.
      next_drain_move_ = absl::Now() + kDrainingRetryInterval;
      POLLEN_LOG_WARN("session {}: cannot move off draining {} yet, staying "
                      "on it and looking again in {}: {}",
                      session_id_, node,
                      absl::FormatDuration(kDrainingRetryInterval),
                      moved.ToString());
    }
  }
}

void InferenceChain::Close() {
  for (auto& hop : hops_) {
    if (hop->stream) hop->stream->Close();
  }
  hops_.clear();
}

}  // namespace pollen::client
