#include "node/block_service.h"

#include <arpa/inet.h>

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/block_span.h"
#include "node/inference_reactor.h"
#include "node/push_receiver.h"
#include "node/session_manager.h"
#include "node/session_steps_reactor.h"
#include "node/training_reactor.h"

namespace pollen::node {
namespace {

std::string RangeString(int64_t start, int64_t end) {
  return absl::StrCat(start, ":", end);
}

// Strips the port from "host:port" or "[host]:port" and the brackets from an
// IPv6 host.
std::string HostOfPeerAddress(const std::string& address) {
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    return close == std::string::npos ? "" : address.substr(1, close - 1);
  }
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

}  // namespace

const char* PollenVersion() { return "0.1.0"; }

std::shared_ptr<const BlockSpan> ServedSpans::current() const {
  absl::MutexLock lock(&mu_);
  return current_;
}

void ServedSpans::Set(std::shared_ptr<const BlockSpan> current,
                      std::shared_ptr<const BlockSpan> previous) {
  absl::MutexLock lock(&mu_);
  current_ = std::move(current);
  previous_ = std::move(previous);
}

absl::StatusOr<std::shared_ptr<const BlockSpan>> ServedSpans::SpanFor(
    int64_t from, int64_t to) const {
  absl::MutexLock lock(&mu_);
  if (current_ == nullptr) {
    return absl::UnavailableError("node is still loading its blocks");
  }
  const BlockSpan& current = *current_;
  if (from >= to || to > current.config().num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blocks ", RangeString(from, to),
        " are not a non-empty part of the span ",
        RangeString(current.start(), current.end()),
        " served by this node (the model has ",
        current.config().num_hidden_layers, " blocks)"));
  }
  for (const std::shared_ptr<const BlockSpan>& span : {current_, previous_}) {
    if (span != nullptr && span->start() <= from && to <= span->end()) {
      return span;
    }
  }
  return absl::UnavailableError(absl::StrCat(
      "blocks ", RangeString(from, to), " are not served by this node, which "
      "serves ", RangeString(current.start(), current.end()),
      "; fetch fresh records and use another node"));
}

bool IsLoopbackPeer(const std::string& peer) {
  if (absl::StartsWith(peer, "unix:") ||
      absl::StartsWith(peer, "unix-abstract:")) {
    return true;
  }

  // gRPC may percent-encode the brackets and colons of IPv6 addresses.
  std::string address;
  if (absl::StartsWith(peer, "ipv4:")) {
    address = peer.substr(5);
  } else if (absl::StartsWith(peer, "ipv6:")) {
    address = absl::StrReplaceAll(peer.substr(5),
                                  {{"%5B", "["}, {"%5D", "]"}, {"%3A", ":"},
                                   {"%5b", "["}, {"%5d", "]"}, {"%3a", ":"}});
  } else {
    return false;
  }
  const std::string host = HostOfPeerAddress(address);

  in_addr ipv4;
  if (inet_pton(AF_INET, host.c_str(), &ipv4) == 1) {
    return (ntohl(ipv4.s_addr) >> 24) == 127;
  }
  in6_addr ipv6;
  if (inet_pton(AF_INET6, host.c_str(), &ipv6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&ipv6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&ipv6) && ipv6.s6_addr[12] == 127;
  }
  return false;
}

namespace {

// Returns the function that posts a request for the next call of a
// streaming method, where `request` is the method's RequestX member of
// the generated AsyncService.
template <class Call, class Service, class RequestMethod>
typename CallAcceptor<Call>::RequestFunction StreamRequest(
    Service* service, RequestMethod request, grpc::ServerCompletionQueue* queue) {
  return [service, request, queue](Call* call, void* tag) {
    (service->*request)(&call->context, &call->stream, queue, queue, tag);
  };
}

// As StreamRequest, for a unary method.
template <class Call, class Service, class RequestMethod>
typename CallAcceptor<Call>::RequestFunction UnaryRequest(
    Service* service, RequestMethod request, grpc::ServerCompletionQueue* queue) {
  return [service, request, queue](Call* call, void* tag) {
    (service->*request)(&call->context, &call->request, &call->responder,
                        queue, queue, tag);
  };
}

}  // namespace

void BlockServiceImpl::StartAccepting(CallLoop* loop) {
  grpc::ServerCompletionQueue* queue = loop->queue();
  using InferenceCall =
      ServerStreamCall<v1::InferenceRequest, v1::InferenceResponse>;
  using PushCall = ServerStreamCall<v1::PushRequest, v1::PushRejection>;
  using StepsCall =
      ServerStreamCall<v1::SessionStepsRequest, v1::SessionStepsResponse>;
  using TrainingCall = ServerStreamCall<v1::PayloadChunk, v1::PayloadChunk>;

  // Each reactor deletes itself in OnDone.
  CallAcceptor<InferenceCall>::Start(
      loop,
      StreamRequest<InferenceCall>(this, &BlockServiceImpl::RequestInference,
                                   queue),
      [this](std::unique_ptr<InferenceCall> call) {
        new InferenceReactor(context_, std::move(call));
      });
  CallAcceptor<PushCall>::Start(
      loop,
      StreamRequest<PushCall>(this, &BlockServiceImpl::RequestPushSteps, queue),
      [this](std::unique_ptr<PushCall> call) {
        new PushReceiver(context_, std::move(call));
      });
  CallAcceptor<StepsCall>::Start(
      loop,
      StreamRequest<StepsCall>(this, &BlockServiceImpl::RequestSessionSteps,
                               queue),
      [this](std::unique_ptr<StepsCall> call) {
        new SessionStepsReactor(context_, std::move(call));
      });
  CallAcceptor<TrainingCall>::Start(
      loop,
      StreamRequest<TrainingCall>(this, &BlockServiceImpl::RequestForward,
                                  queue),
      [this](std::unique_ptr<TrainingCall> call) {
        new TrainingReactor(context_, TrainingReactor::Kind::kForward,
                            std::move(call));
      });
  CallAcceptor<TrainingCall>::Start(
      loop,
      StreamRequest<TrainingCall>(this, &BlockServiceImpl::RequestBackward,
                                  queue),
      [this](std::unique_ptr<TrainingCall> call) {
        new TrainingReactor(context_, TrainingReactor::Kind::kBackward,
                            std::move(call));
      });

  CallAcceptor<InfoCall>::Start(
      loop, UnaryRequest<InfoCall>(this, &BlockServiceImpl::RequestInfo, queue),
      [this](std::unique_ptr<InfoCall> call) { Info(std::move(call)); });
  CallAcceptor<MoveBlocksCall>::Start(
      loop,
      UnaryRequest<MoveBlocksCall>(this, &BlockServiceImpl::RequestMoveBlocks,
                                   queue),
      [this](std::unique_ptr<MoveBlocksCall> call) {
        MoveBlocks(std::move(call));
      });
}

void BlockServiceImpl::Info(std::unique_ptr<InfoCall> call) {
  v1::InfoResponse* response = &call->response;
  response->set_version(PollenVersion());
  response->set_node_id(context_->node_id);
  response->set_public_name(context_->public_name);

  const std::shared_ptr<const BlockSpan> span = context_->spans.current();
  v1::ServedSpan* served = response->add_spans();
  served->set_model_id(context_->model_id);
  served->mutable_blocks()->set_start(span->start());
  served->mutable_blocks()->set_end(span->end());

  response->set_cache_tokens_left(context_->sessions->cache_tokens_left());
  response->set_cache_tokens_total(context_->sessions->cache_tokens_total());
  response->set_open_sessions(context_->sessions->open_sessions());
  FinishUnary(std::move(call), grpc::Status::OK);
}

void BlockServiceImpl::MoveBlocks(std::unique_ptr<MoveBlocksCall> call) {
  const int64_t start = call->request.blocks().start();
  const int64_t end = call->request.blocks().end();
  const int64_t num_blocks = context_->config.num_hidden_layers;
  const std::string peer = call->context.peer();

  // Validate the caller and the range.
  if (!IsLoopbackPeer(peer)) {
    POLLEN_LOG_WARN("rejected MoveBlocks {} from non-loopback peer {}",
                    RangeString(start, end), peer);
    FinishUnary(std::move(call),
                grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                             absl::StrCat("MoveBlocks is accepted only from "
                                          "loopback peers; ",
                                          peer,
                                          " is not one. Run it on the node's "
                                          "machine")));
    return;
  }
  if (start >= end || end > num_blocks) {
    FinishUnary(std::move(call),
                grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                             absl::StrCat("blocks ", RangeString(start, end),
                                          " are not a non-empty range within "
                                          "the model's ",
                                          num_blocks, " blocks")));
    return;
  }
  if (context_->draining.load()) {
    FinishUnary(std::move(call),
                grpc::Status(grpc::StatusCode::UNAVAILABLE,
                             "node is shutting down and does not move"));
    return;
  }
  if (!context_->move_blocks) {
    FinishUnary(std::move(call),
                grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                             "this node cannot move its blocks"));
    return;
  }

  // Run the move on the node's mover thread; it finishes the call.
  POLLEN_LOG_INFO("MoveBlocks {} requested by {}", RangeString(start, end),
                  peer);
  MoveBlocksCall* moving = call.release();
  context_->move_blocks(
      static_cast<int>(start), static_cast<int>(end),
      [moving](absl::StatusOr<v1::BlockRange> moved) {
        std::unique_ptr<MoveBlocksCall> done(moving);
        if (moved.ok()) *done->response.mutable_blocks() = *moved;
        FinishUnary(std::move(done), ToGrpcStatus(moved.status()));
      });
}

}  // namespace pollen::node
