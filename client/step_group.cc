#include "client/step_group.h"

#include <algorithm>
#include <chrono>
#include <set>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"

namespace pollen::client {
namespace {

// How long a message may take to leave, and a node to finish a stream.
constexpr absl::Duration kWriteTimeout = absl::Seconds(5);

// How often the wait for replies pauses to check the chains' own streams,
// where a node replies when it could not push or found no SessionSteps
// stream of the id the step names.
constexpr absl::Duration kOwnStreamCheckInterval = absl::Milliseconds(10);

}  // namespace

struct StepGroup::Link {
  enum class Op { kWrite, kRead, kOther };
  struct Tag {
    Link* link;
    Op op;
  };

  std::string address;
  // The stream's id on its node, which steps name in reply_stream_id.
  std::string stream_id;
  std::unique_ptr<v1::BlockService::Stub> stub;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<v1::SessionStepsRequest,
                                                v1::SessionStepsResponse>>
      stream;
  // Unchanged while a write is pending; the read fills `response`.
  v1::SessionStepsRequest request;
  v1::SessionStepsResponse response;
  grpc::Status finish_status;

  Tag write_tag{this, Op::kWrite};
  Tag read_tag{this, Op::kRead};
  Tag other_tag{this, Op::kOther};
  bool write_pending = false;
  bool read_pending = false;
  int other_pending = 0;
  // A read returned and its message (when read_ok) is not handled yet.
  bool read_returned = false;
  bool read_ok = false;
  bool failed = false;
  absl::Status error;
};

struct StepGroup::Member {
  InferenceChain* chain;
  size_t index;  // into Step's arguments
  at::Tensor input;
  // Relayed: the input of the hop the step is at.
  at::Tensor current;
  // Relayed: whether the current hop has replied.
  bool hop_done = false;
  std::optional<InferenceChain::Attempt> attempt;

  int64_t end() const { return chain->position_ + input.size(1); }
};

StepGroup::StepGroup() = default;

StepGroup::~StepGroup() {
  // Half-close every open stream, then wait for the nodes' statuses, so
  // that they end cleanly; whatever does not end in time is cancelled.
  for (auto& [address, link] : links_) {
    if (link->failed) continue;
    while (link->write_pending && NextEvent(absl::Now() + kWriteTimeout)) {
    }
    if (link->write_pending) {
      link->context.TryCancel();
      continue;
    }
    link->stream->WritesDone(&link->other_tag);
    link->stream->Finish(&link->finish_status, &link->other_tag);
    link->other_pending += 2;
  }
  const absl::Time deadline = absl::Now() + kWriteTimeout;
  auto busy = [this] {
    for (const auto& [address, link] : links_) {
      if (link->write_pending || link->read_pending || link->other_pending > 0) {
        return true;
      }
    }
    for (const auto& link : retired_) {
      if (link->write_pending || link->read_pending || link->other_pending > 0) {
        return true;
      }
    }
    return false;
  };
  while (busy() && NextEvent(deadline)) {
  }
  if (busy()) {
    for (auto& [address, link] : links_) link->context.TryCancel();
    for (auto& link : retired_) link->context.TryCancel();
    while (busy() && NextEvent(absl::InfiniteFuture())) {
    }
  }
  queue_.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (queue_.Next(&tag, &ok)) {
  }
}

bool StepGroup::NextEvent(absl::Time deadline) {
  void* tag = nullptr;
  bool ok = false;
  const grpc::CompletionQueue::NextStatus next =
      queue_.AsyncNext(&tag, &ok, absl::ToChronoTime(deadline));
  if (next != grpc::CompletionQueue::GOT_EVENT) return false;
  Link::Tag* event = static_cast<Link::Tag*>(tag);
  Link& link = *event->link;
  switch (event->op) {
    case Link::Op::kWrite:
      link.write_pending = false;
      break;
    case Link::Op::kRead:
      link.read_pending = false;
      link.read_returned = true;
      link.read_ok = ok;
      break;
    case Link::Op::kOther:
      --link.other_pending;
      break;
  }
  return true;
}

absl::StatusOr<StepGroup::Link*> StepGroup::LinkTo(ChannelPool& channels,
                                                   const std::string& address) {
  auto it = links_.find(address);
  if (it != links_.end()) {
    if (!it->second->failed) return it->second.get();
    // gRPC may still hold its operations; it goes with the group.
    retired_.push_back(std::move(it->second));
    links_.erase(it);
  }

  auto link = std::make_unique<Link>();
  link->address = address;
  link->stream_id = NewSessionId();
  link->stub = v1::BlockService::NewStub(channels.Get(address));
  // The headers go out with the open message. With corked metadata gRPC
  // returns no completion for StartCall (see HopStream::Open).
  link->context.set_initial_metadata_corked(true);
  link->stream = link->stub->PrepareAsyncSessionSteps(&link->context, &queue_);
  link->stream->StartCall(&link->other_tag);
  link->request.mutable_open()->set_stream_id(link->stream_id);
  link->stream->Write(link->request, &link->write_tag);
  link->write_pending = true;
  link->stream->Read(&link->response, &link->read_tag);
  link->read_pending = true;
  POLLEN_LOG_DEBUG("SessionSteps stream '{}' to {} opened", link->stream_id,
                   address);
  Link* raw = link.get();
  links_[address] = std::move(link);
  return raw;
}

absl::Status StepGroup::Send(Link& link) {
  const absl::Time deadline = absl::Now() + kWriteTimeout;
  while (link.write_pending && NextEvent(deadline)) {
  }
  if (link.write_pending) {
    link.context.TryCancel();
    link.failed = true;
    link.error = absl::DeadlineExceededError(absl::StrCat(
        "SessionSteps stream to ", link.address, ": the previous message was ",
        "not sent within ", absl::FormatDuration(kWriteTimeout)));
    return link.error;
  }
  link.stream->Write(link.request, &link.write_tag);
  link.write_pending = true;
  return absl::OkStatus();
}

void StepGroup::FailLink(Link& link) {
  link.failed = true;
  link.stream->Finish(&link.finish_status, &link.other_tag);
  ++link.other_pending;
  const absl::Time deadline = absl::Now() + kWriteTimeout;
  while (link.other_pending > 0 && NextEvent(deadline)) {
  }
  if (link.other_pending > 0) link.context.TryCancel();
  const absl::Status status =
      link.finish_status.ok() || link.other_pending > 0
          ? absl::UnavailableError("the stream ended")
          : FromGrpcStatus(link.finish_status);
  link.error = absl::Status(
      status.code(), absl::StrCat("SessionSteps stream to ", link.address, ": ",
                                  status.message()));
  POLLEN_LOG_WARN("{}", link.error.ToString());
}

template <typename OnReply, typename OnLinkFailure>
void StepGroup::Receive(const std::vector<Link*>& links, absl::Time until,
                        const std::vector<Member*>& pending, OnReply on_reply,
                        OnLinkFailure on_link_failure) {
  auto waiting = [&pending] {
    return std::any_of(pending.begin(), pending.end(), [](const Member* m) {
      return !m->attempt.has_value() && !m->hop_done;
    });
  };
  while (waiting()) {
    bool handled = false;
    for (Link* link : links) {
      if (!link->read_returned) continue;
      link->read_returned = false;
      handled = true;
      if (!link->read_ok) {
        FailLink(*link);
        on_link_failure(*link);
        continue;
      }
      for (const v1::SessionReply& reply : link->response.replies()) {
        on_reply(*link, reply);
      }
    }
    if (handled) continue;
    for (Link* link : links) {
      if (!link->failed && !link->read_pending) {
        link->stream->Read(&link->response, &link->read_tag);
        link->read_pending = true;
      }
    }
    if (!NextEvent(until)) return;
  }
}

std::vector<absl::StatusOr<at::Tensor>> StepGroup::Step(
    const std::vector<InferenceChain*>& chains,
    const std::vector<at::Tensor>& hidden) {
  std::vector<absl::StatusOr<at::Tensor>> results(
      chains.size(), absl::UnknownError("the step did not run"));
  if (chains.size() != hidden.size()) {
    const absl::Status mismatch = absl::InvalidArgumentError(absl::StrCat(
        "a grouped step needs one input per chain; got ", chains.size(),
        " chains and ", hidden.size(), " inputs"));
    std::fill(results.begin(), results.end(), mismatch);
    return results;
  }
  std::set<const InferenceChain*> distinct(chains.begin(), chains.end());
  if (distinct.size() != chains.size() || distinct.count(nullptr) > 0) {
    std::fill(results.begin(), results.end(),
              absl::InvalidArgumentError(
                  "a grouped step needs distinct chains, none of them null"));
    return results;
  }

  // Chains that share a route and a way of stepping (push or relay) travel
  // together. A chain with a hop not open yet, or alone on its route,
  // steps on its own.
  std::map<std::string, std::vector<Member>> by_route;
  std::vector<size_t> alone;
  for (size_t i = 0; i < chains.size(); ++i) {
    InferenceChain* chain = chains[i];
    bool open = !chain->hops_.empty();
    std::string key = chain->CanPush() ? "push" : "relay";
    for (const auto& hop : chain->hops_) {
      open = open && hop->stream != nullptr;
      absl::StrAppend(&key, " ", hop->route_hop.server.address, "/",
                      hop->route_hop.start, ":", hop->route_hop.end);
    }
    if (open) {
      by_route[key].push_back(Member{chain, i, hidden[i], hidden[i]});
    } else {
      alone.push_back(i);
    }
  }
  for (auto& [key, members] : by_route) {
    if (members.size() < 2) {
      alone.push_back(members.front().index);
      continue;
    }
    if (members.front().chain->CanPush()) {
      RunPushed(members);
    } else {
      RunRelayed(members);
    }
    for (Member& member : members) {
      results[member.index] =
          member.chain->FinishStep(member.input, std::move(member.attempt));
    }
  }
  for (const size_t i : alone) results[i] = chains[i]->Step(hidden[i]);
  return results;
}

void StepGroup::RunPushed(std::vector<Member>& members) {
  InferenceChain& lead = *members.front().chain;
  const size_t last = lead.hops_.size() - 1;
  const scheduler::RouteHop& first_hop = lead.hops_[0]->route_hop;
  const scheduler::RouteHop& last_hop = lead.hops_[last]->route_hop;
  absl::StatusOr<Link*> to = LinkTo(lead.channels_, first_hop.server.address);
  absl::StatusOr<Link*> from =
      to.ok() ? LinkTo(lead.channels_, last_hop.server.address) : to;
  if (!from.ok()) {
    // Each chain then pushes on its own.
    POLLEN_LOG_WARN("cannot group the steps of {} sessions: {}", members.size(),
                    from.status().ToString());
    return;
  }

  // One message to the first node carries every step, each naming the
  // stream to the last node for its reply.
  Link& first = **to;
  Link& reply_link = **from;
  first.request.Clear();
  // Keys view the chains' session ids, so the maps copy no strings.
  absl::flat_hash_map<absl::string_view, Member*> by_first_session;
  absl::flat_hash_map<absl::string_view, Member*> by_last_session;
  by_first_session.reserve(members.size());
  by_last_session.reserve(members.size());
  for (Member& member : members) {
    InferenceChain& chain = *member.chain;
    v1::InferenceStep* step = first.request.add_steps();
    const absl::Status encoded = TensorToProto(
        member.input, step->mutable_hidden_states(), chain.options_.compression);
    if (!encoded.ok()) {
      member.attempt = InferenceChain::Attempt{true, encoded, member.input, 0};
      first.request.mutable_steps()->RemoveLast();
      continue;
    }
    step->set_position(static_cast<uint32_t>(chain.position_));
    step->set_session_id(chain.hops_[0]->stream_session_id);
    for (v1::PushTarget& target : chain.PushTargets()) {
      *step->add_push_to() = std::move(target);
    }
    step->set_reply_stream_id(reply_link.stream_id);
    by_first_session[chain.hops_[0]->stream_session_id] = &member;
    by_last_session[chain.hops_[last]->stream_session_id] = &member;
  }
  if (first.request.steps().empty()) return;
  if (!Send(first).ok()) return;  // nothing went out: each chain pushes alone

  auto on_reply = [&](Link& link, const v1::SessionReply& reply) {
    const bool ok = reply.code() == 0;
    auto& sessions = &link == &reply_link && ok ? by_last_session
                                                 : by_first_session;
    auto it = sessions.find(reply.session_id());
    if (it == sessions.end() || it->second->attempt.has_value()) return;
    Member& member = *it->second;
    InferenceChain& chain = *member.chain;
    // Errors come from the node a step was sent to, outputs from the last.
    const size_t hop = ok || &link != &first ? last : 0;
    if (!ok) {
      const absl::Status status(
          static_cast<absl::StatusCode>(reply.code()),
          absl::StrCat(DescribeHop(chain.hops_[hop]->route_hop),
                       " rejected the step: ", reply.message()));
      if (IsFailoverError(status)) {
        chain.RecordFailure(chain.hops_[hop]->route_hop.server.node_id);
      }
      member.attempt = InferenceChain::Attempt{true, status, member.input, hop};
      return;
    }
    // A reply to an earlier step that this chain gave up on.
    if (reply.response().position() != member.end()) return;
    absl::StatusOr<HopStream::StepOutput> output = StepOutputFromResponse(
        reply.response(), chain.hops_[last]->route_hop);
    at::Tensor current = member.input;
    size_t failed = last;
    absl::StatusOr<size_t> resume =
        output.ok() ? chain.AcceptPushed(*std::move(output), last, &current,
                                         &failed)
                    : absl::StatusOr<size_t>(output.status());
    member.attempt =
        InferenceChain::Attempt{true, std::move(resume), std::move(current),
                                failed};
  };
  auto on_link_failure = [&](Link& link) {
    for (Member& member : members) {
      if (member.attempt.has_value()) continue;
      member.attempt = InferenceChain::Attempt{
          true, link.error, member.input, &link == &first ? size_t{0} : last};
    }
  };

  std::vector<Member*> pending;
  for (Member& member : members) pending.push_back(&member);
  const absl::Time deadline = absl::Now() + lead.options_.step_timeout;
  while (true) {
    Receive({&first, &reply_link},
            std::min(deadline, absl::Now() + kOwnStreamCheckInterval), pending,
            on_reply, on_link_failure);

    // No reply for a while: a node that could not push, or found no
    // stream for the reply, replied on the session's own stream.
    bool waiting = false;
    for (Member& member : members) {
      if (member.attempt.has_value()) continue;
      InferenceChain& chain = *member.chain;
      size_t failed = last;
      absl::StatusOr<std::optional<InferenceChain::PushReply>> polled =
          chain.PollPushed(member.input.size(1), chain.hops_.size(),
                           absl::Now(), &failed);
      if (!polled.ok()) {
        member.attempt =
            InferenceChain::Attempt{true, polled.status(), member.input, failed};
      } else if (polled->has_value()) {
        at::Tensor current = member.input;
        absl::StatusOr<size_t> resume = chain.AcceptPushed(
            std::move((*polled)->output), (*polled)->hop, &current, &failed);
        member.attempt = InferenceChain::Attempt{true, std::move(resume),
                                                 std::move(current), failed};
      } else {
        waiting = true;
      }
    }
    if (!waiting) return;
    if (absl::Now() >= deadline) break;
  }
  for (Member& member : members) {
    if (member.attempt.has_value()) continue;
    member.attempt = InferenceChain::Attempt{
        true,
        absl::DeadlineExceededError(absl::StrCat(
            "no node replied to the grouped pushed step at position ",
            member.chain->position_, " within ",
            absl::FormatDuration(lead.options_.step_timeout))),
        member.input, last};
  }
}

void StepGroup::RunRelayed(std::vector<Member>& members) {
  InferenceChain& lead = *members.front().chain;
  const size_t num_hops = lead.hops_.size();
  for (size_t k = 0; k < num_hops; ++k) {
    std::vector<Member*> active;
    for (Member& member : members) {
      member.hop_done = false;
      if (!member.attempt.has_value()) active.push_back(&member);
    }
    if (active.empty()) return;

    // Without a stream to this node, the chains carry on alone from here.
    const scheduler::RouteHop& route_hop = lead.hops_[k]->route_hop;
    absl::StatusOr<Link*> linked = LinkTo(lead.channels_, route_hop.server.address);
    auto relay_alone = [k](Member& member) {
      size_t failed = k;
      const absl::Status ran =
          member.chain->RunHops(k, &member.current, &failed);
      member.attempt = InferenceChain::Attempt{
          false, ran.ok() ? absl::StatusOr<size_t>(member.chain->hops_.size())
                          : absl::StatusOr<size_t>(ran),
          member.current, failed};
    };
    if (!linked.ok()) {
      for (Member* member : active) relay_alone(*member);
      return;
    }
    Link& link = **linked;
    link.request.Clear();
    absl::flat_hash_map<absl::string_view, Member*> by_session;
    by_session.reserve(active.size());
    for (Member* member : active) {
      InferenceChain& chain = *member->chain;
      v1::InferenceStep* step = link.request.add_steps();
      const absl::Status encoded = TensorToProto(
          member->current, step->mutable_hidden_states(),
          chain.options_.compression);
      if (!encoded.ok()) {
        member->attempt =
            InferenceChain::Attempt{false, encoded, member->current, k};
        link.request.mutable_steps()->RemoveLast();
        continue;
      }
      step->set_position(static_cast<uint32_t>(chain.position_));
      step->set_session_id(chain.hops_[k]->stream_session_id);
      step->set_reply_stream_id(link.stream_id);
      by_session[chain.hops_[k]->stream_session_id] = member;
    }
    if (link.request.steps().empty()) continue;
    if (!Send(link).ok()) {
      for (Member* member : active) {
        if (!member->attempt.has_value()) relay_alone(*member);
      }
      return;
    }

    // Keeps a hop's output as the next hop's input, as RunHops does.
    auto accept = [k](Member& member, HopStream::StepOutput output) {
      auto& hop = *member.chain->hops_[k];
      hop.inputs.push_back(member.current);
      hop.draining = hop.draining || output.draining;
      member.current = std::move(output.hidden);
      member.hop_done = true;
    };
    auto fail = [k](Member& member, const absl::Status& status) {
      member.chain->RecordFailure(member.chain->hops_[k]->route_hop.server.node_id);
      member.attempt = InferenceChain::Attempt{false, status, member.current, k};
    };
    auto on_reply = [&](Link&, const v1::SessionReply& reply) {
      auto it = by_session.find(reply.session_id());
      if (it == by_session.end()) return;
      Member& member = *it->second;
      if (member.attempt.has_value() || member.hop_done) return;
      if (reply.code() != 0) {
        fail(member, absl::Status(static_cast<absl::StatusCode>(reply.code()),
                                  absl::StrCat(DescribeHop(route_hop),
                                               " rejected the step: ",
                                               reply.message())));
        return;
      }
      if (reply.response().position() != member.end()) return;
      absl::StatusOr<HopStream::StepOutput> output =
          StepOutputFromResponse(reply.response(), route_hop);
      if (output.ok()) {
        accept(member, *std::move(output));
      } else {
        fail(member, output.status());
      }
    };
    auto on_link_failure = [&](Link& failed_link) {
      for (Member* member : active) {
        if (!member->attempt.has_value() && !member->hop_done) {
          fail(*member, failed_link.error);
        }
      }
    };

    const absl::Time deadline = absl::Now() + lead.options_.step_timeout;
    while (true) {
      Receive({&link}, std::min(deadline, absl::Now() + kOwnStreamCheckInterval),
              active, on_reply, on_link_failure);
      // A node that found no stream for the reply replies on the
      // session's own stream.
      bool waiting = false;
      for (Member* member : active) {
        if (member->attempt.has_value() || member->hop_done) continue;
        absl::StatusOr<std::optional<HopStream::StepOutput>> polled =
            member->chain->hops_[k]->stream->Poll(member->end(), absl::Now());
        if (!polled.ok()) {
          fail(*member, polled.status());
        } else if (polled->has_value()) {
          accept(*member, **std::move(polled));
        } else {
          waiting = true;
        }
      }
      if (!waiting) break;
      if (absl::Now() >= deadline) {
        for (Member* member : active) {
          if (member->attempt.has_value() || member->hop_done) continue;
          fail(*member, absl::DeadlineExceededError(absl::StrCat(
                            DescribeHop(route_hop), " did not answer within ",
                            absl::FormatDuration(lead.options_.step_timeout))));
        }
        break;
      }
    }
  }
  for (Member& member : members) {
    if (member.attempt.has_value()) continue;
    member.attempt = InferenceChain::Attempt{
        false, member.chain->hops_.size(), member.current, num_hops - 1};
  }
}

}  // namespace pollen::client
