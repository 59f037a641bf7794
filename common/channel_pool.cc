#include "common/channel_pool.h"

namespace pollen {
namespace {

// HTTP/2 flow-control window of a stream: hidden states of a 512-token
// prefill of an 8192-wide float32 model (16 MiB) in one round trip.
constexpr int kStreamWindowBytes = 16 << 20;

}  // namespace

std::shared_ptr<grpc::Channel> ChannelPool::Get(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto it = channels_.find(address);
  if (it != channels_.end()) return it->second;

  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(kMaxMessageBytes);
  arguments.SetMaxSendMessageSize(kMaxMessageBytes);
  // Keepalive pings find a dead node during a long wait between steps.
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  // A failed node should be reported at once rather than retried for the
  // default backoff of up to two minutes.
  arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  // Each channel gets its own connection, so that a stuck node cannot delay
  // streams to other nodes sharing a subchannel.
  arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // gRPC's bandwidth-delay probe sends pings as data arrives, and each ping
  // wakes both sides once more per step. A fixed window of
  // kStreamWindowBytes replaces the window the probe would have grown.
  arguments.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  arguments.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, kStreamWindowBytes);
  auto channel = grpc::CreateCustomChannel(
      address, grpc::InsecureChannelCredentials(), arguments);
  channels_[address] = channel;
  return channel;
}

}  // namespace pollen
