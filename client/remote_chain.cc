#include "client/remote_chain.h"

#include <future>
#include <random>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"

namespace pollen::client {
namespace {

constexpr int kMaxMessageBytes = static_cast<int>(kMaxTensorBytes + (1 << 20));

std::string DescribeHop(const scheduler::RouteHop& hop) {
  return absl::StrCat("node ", hop.server.node_id.substr(0, 12), " at ",
                      hop.server.address, " (blocks ", hop.start, ":",
                      hop.end, ")");
}

}  // namespace

std::shared_ptr<grpc::Channel> ChannelPool::Get(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto it = channels_.find(address);
  if (it != channels_.end()) return it->second;

  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(kMaxMessageBytes);
  arguments.SetMaxSendMessageSize(kMaxMessageBytes);
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  // Each channel gets its own connection, so that a stuck node cannot delay
  // streams to other nodes sharing a subchannel.
  arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto channel = grpc::CreateCustomChannel(
      address, grpc::InsecureChannelCredentials(), arguments);
  channels_[address] = channel;
  return channel;
}

std::string NewSessionId() {
  std::random_device device;
  std::mt19937_64 generator((static_cast<uint64_t>(device()) << 32) ^ device());
  return absl::StrFormat("%016x%016x", generator(), generator());
}

// One Inference stream to one node.
class InferenceChain::HopStream {
 public:
  HopStream(const scheduler::RouteHop& hop,
            std::shared_ptr<grpc::Channel> channel)
      : hop_(hop), stub_(v1::BlockService::NewStub(std::move(channel))) {}

  ~HopStream() { Close(); }

  absl::Status Open(const ChainOptions& options, const std::string& session_id,
                    absl::Duration timeout) {
    stream_ = stub_->Inference(&context_);
    v1::InferenceRequest request;
    v1::InferenceOpen* open = request.mutable_open();
    open->set_model_id(options.model_id);
    open->mutable_blocks()->set_start(hop_.start);
    open->mutable_blocks()->set_end(hop_.end);
    open->set_max_length(static_cast<uint32_t>(options.max_length));
    open->set_session_id(session_id);
    open->set_batch_size(static_cast<uint32_t>(options.batch_size));
    v1::InferenceResponse response;
    return Exchange(request, &response, timeout);
  }

  absl::StatusOr<at::Tensor> Step(const at::Tensor& hidden, int64_t position,
                                  absl::Duration timeout) {
    v1::InferenceRequest request;
    v1::InferenceStep* step = request.mutable_step();
    POLLEN_RETURN_IF_ERROR(
        TensorToProto(hidden, step->mutable_hidden_states()));
    step->set_position(static_cast<uint32_t>(position));

    v1::InferenceResponse response;
    POLLEN_RETURN_IF_ERROR(Exchange(request, &response, timeout));
    return TensorFromProto(response.hidden_states(),
                           absl::StrCat("output of ", DescribeHop(hop_)));
  }

  void Close() {
    if (stream_ == nullptr || closed_) return;
    closed_ = true;
    // Half-close, then collect the status so that the node sees a clean end
    // of stream and frees the session at once.
    if (!failed_) {
      stream_->WritesDone();
      const grpc::Status status = stream_->Finish();
      if (!status.ok()) {
        POLLEN_LOG_DEBUG("closing stream to {}: {}", DescribeHop(hop_),
                         status.error_message());
      }
    } else {
      context_.TryCancel();
    }
  }

 private:
  // Writes one request and reads its response within `timeout`. On failure
  // it fetches the node's status so the error says why.
  absl::Status Exchange(const v1::InferenceRequest& request,
                        v1::InferenceResponse* response,
                        absl::Duration timeout) {
    if (failed_) {
      return absl::FailedPreconditionError(
          absl::StrCat("stream to ", DescribeHop(hop_), " already failed"));
    }
    // The synchronous stream has no per-message deadline, so the exchange
    // runs on a helper thread and the call is cancelled when it overruns.
    auto exchange = std::async(std::launch::async, [&]() {
      return stream_->Write(request) && stream_->Read(response);
    });
    if (exchange.wait_for(absl::ToChronoMilliseconds(timeout)) !=
        std::future_status::ready) {
      context_.TryCancel();
      exchange.wait();
      failed_ = true;
      return absl::DeadlineExceededError(
          absl::StrCat(DescribeHop(hop_), " did not answer within ",
                       absl::FormatDuration(timeout)));
    }
    if (exchange.get()) return absl::OkStatus();

    failed_ = true;
    const grpc::Status status = stream_->Finish();
    closed_ = true;
    const absl::Status error = status.ok()
        ? absl::UnavailableError("stream closed without a reply")
        : FromGrpcStatus(status);
    return absl::Status(error.code(), absl::StrCat(DescribeHop(hop_), ": ",
                                                   error.message()));
  }

  const scheduler::RouteHop hop_;
  std::unique_ptr<v1::BlockService::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<
      grpc::ClientReaderWriter<v1::InferenceRequest, v1::InferenceResponse>>
      stream_;
  bool failed_ = false;
  bool closed_ = false;
};

InferenceChain::InferenceChain(std::vector<scheduler::RouteHop> route,
                               ChainOptions options, std::string session_id)
    : route_(std::move(route)),
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
      new InferenceChain(route, options, NewSessionId()));
  for (const scheduler::RouteHop& hop : route) {
    auto stream = std::make_unique<HopStream>(
        hop, channels.Get(hop.server.address));
    POLLEN_RETURN_IF_ERROR(
        stream->Open(options, chain->session_id_, options.step_timeout));
    chain->hops_.push_back(std::move(stream));
  }
  POLLEN_LOG_DEBUG("session {} open through {} nodes", chain->session_id_,
                   route.size());
  return chain;
}

absl::StatusOr<at::Tensor> InferenceChain::Step(const at::Tensor& hidden) {
  at::Tensor current = hidden;
  for (size_t i = 0; i < hops_.size(); ++i) {
    POLLEN_ASSIGN_OR_RETURN(
        current, hops_[i]->Step(current, position_, options_.step_timeout));
  }
  position_ += hidden.size(1);
  return current;
}

void InferenceChain::Close() {
  for (auto& hop : hops_) hop->Close();
  hops_.clear();
}

}  // namespace pollen::client
