#include "node/node_server.h"

#include <signal.h>

#include <memory>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/checkpoint.h"
#include "common/dht_registry.h"
#include "common/identity.h"
#include "common/logging.h"
#include "common/model_id.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"
#include "node/block_service.h"
#include "node/block_span.h"
#include "node/session_manager.h"

namespace pollen::node {
namespace {

// Headroom over the largest tensor for the rest of a message.
constexpr int kMaxMessageBytes = static_cast<int>(kMaxTensorBytes + (1 << 20));

absl::StatusOr<at::ScalarType> ParseDtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "float16" || name == "fp16") return at::kHalf;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown dtype '", name, "'; use float32, float16 or bfloat16"));
}

absl::StatusOr<at::Device> ParseDevice(const std::string& name) {
  try {
    return at::Device(name);
  } catch (const c10::Error&) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown device '", name, "'; use cpu, cuda or cuda:N"));
  }
}

absl::Status ValidateOptions(const NodeOptions& options) {
  if (options.cache_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cache-tokens must be positive, got ", options.cache_tokens));
  }
  if (options.port < 0 || options.port > 65535 || options.dht_port < 0 ||
      options.dht_port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ports must be in 0..65535, got --port ", options.port,
        " and --dht-port ", options.dht_port));
  }
  if (options.record_ttl <= options.announce_period) {
    return absl::InvalidArgumentError(absl::StrCat(
        "record TTL ", absl::FormatDuration(options.record_ttl),
        " must exceed the announce period ",
        absl::FormatDuration(options.announce_period)));
  }
  return absl::OkStatus();
}

int64_t UnixMillis(absl::Time time) { return absl::ToUnixMillis(time); }

// Fills the record this node announces.
v1::NodeRecord MakeRecord(const ServiceContext& context,
                          const std::string& address, v1::NodeState state,
                          int64_t cache_tokens_left, absl::Duration ttl) {
  const absl::Time now = absl::Now();
  v1::NodeRecord record;
  record.set_model_id(context.model_id);
  record.mutable_blocks()->set_start(context.span->start());
  record.mutable_blocks()->set_end(context.span->end());
  record.set_node_id(context.node_id);
  record.set_address(address);
  record.set_public_name(context.public_name);
  record.set_state(state);
  record.set_cache_tokens_left(cache_tokens_left);
  record.set_announced_ms(UnixMillis(now));
  record.set_expires_ms(UnixMillis(now + ttl));
  record.set_version(PollenVersion());
  record.set_num_blocks(
      static_cast<uint32_t>(context.span->config().num_hidden_layers));
  return record;
}

// Waits up to `timeout` for SIGINT or SIGTERM. Returns the signal, or 0.
int WaitForSignal(const sigset_t& signals, absl::Duration timeout) {
  const timespec wait = absl::ToTimespec(timeout);
  const int signal_number = sigtimedwait(&signals, nullptr, &wait);
  return signal_number > 0 ? signal_number : 0;
}

}  // namespace

absl::Status RunNode(const NodeOptions& options) {
  // Block the stop signals in this thread before any other thread starts,
  // so that every thread inherits the mask and sigtimedwait receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  POLLEN_RETURN_IF_ERROR(ValidateOptions(options));
  POLLEN_ASSIGN_OR_RETURN(const at::ScalarType dtype, ParseDtype(options.dtype));
  POLLEN_ASSIGN_OR_RETURN(const at::Device device, ParseDevice(options.device));
  if (options.threads > 0) at::set_num_threads(options.threads);

  // Load the span.
  POLLEN_ASSIGN_OR_RETURN(std::shared_ptr<const Checkpoint> checkpoint,
                          Checkpoint::Open(options.model_dir));
  const std::string model_id = options.model_id.empty()
                                   ? DefaultModelId(options.model_dir)
                                   : options.model_id;
  const absl::Time load_started = absl::Now();
  POLLEN_ASSIGN_OR_RETURN(
      std::unique_ptr<BlockSpan> span,
      BlockSpan::Load(*checkpoint, options.block_start, options.block_end,
                      dtype, device));
  POLLEN_LOG_INFO("loaded blocks {}:{} of {} ({} MiB of {} on {}) in {}",
                  span->start(), span->end(), model_id,
                  span->ParameterBytes() >> 20, options.dtype,
                  device.str(), absl::FormatDuration(absl::Now() - load_started));

  // Join the DHT with this node's identity.
  dht::crypto::Identity identity;
  if (options.identity_path.empty()) {
    POLLEN_ASSIGN_OR_RETURN(identity, CreateEphemeralIdentity("pollen-node"));
  } else {
    POLLEN_ASSIGN_OR_RETURN(identity, LoadOrCreateIdentity(options.identity_path,
                                                           "pollen-node"));
  }
  DhtOptions dht_options;
  dht_options.port = options.dht_port;
  dht_options.bootstrap = options.initial_peers;
  dht_options.identity = identity;
  POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<DhtRegistry> registry,
                          DhtRegistry::Start(dht_options));
  POLLEN_RETURN_IF_ERROR(registry->WaitConnected(absl::Seconds(30)));

  // Start serving.
  SessionLimits limits;
  limits.cache_token_budget = options.cache_tokens;
  limits.idle_timeout = options.session_idle_timeout;
  SessionManager sessions(*span, limits);

  ServiceContext context;
  context.model_id = model_id;
  context.node_id = registry->node_id();
  context.span = span.get();
  context.sessions = &sessions;
  BlockServiceImpl service(&context);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int bound_port = 0;
  const std::string listen_address =
      absl::StrCat(options.listen_host, ":", options.port);
  builder.AddListeningPort(listen_address, grpc::InsecureServerCredentials(),
                           &bound_port);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             5000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", listen_address,
        "; is the port in use? Pick another with --port"));
  }
  const std::string address = absl::StrCat(options.announce_host, ":", bound_port);
  context.public_name =
      options.public_name.empty() ? address : options.public_name;

  POLLEN_LOG_INFO("node {} serving {} blocks {}:{} at {}, DHT port {}",
                  context.node_id, model_id, span->start(), span->end(),
                  address, registry->port());
  if (options.initial_peers.empty()) {
    POLLEN_LOG_INFO("started a new swarm; others join with --initial-peers {}:{}",
                    options.announce_host, registry->port());
  } else {
    POLLEN_LOG_INFO("joined the swarm through {}",
                    absl::StrJoin(options.initial_peers, ","));
  }

  // Announce, refresh and reap idle sessions until a stop signal arrives.
  absl::Time next_announce = absl::InfinitePast();
  int stop_signal = 0;
  while (stop_signal == 0) {
    const absl::Time now = absl::Now();
    if (now >= next_announce) {
      const v1::NodeRecord record =
          MakeRecord(context, address, v1::NODE_STATE_ONLINE,
                     sessions.cache_tokens_left(), options.record_ttl);
      const absl::Status announced =
          registry->Announce(record, absl::Seconds(10));
      if (announced.ok()) {
        POLLEN_LOG_DEBUG("announced {} blocks {}:{}", model_id, span->start(),
                         span->end());
        next_announce = now + options.announce_period;
      } else {
        POLLEN_LOG_WARN("announce of {} blocks {}:{} failed, retrying in 2s: {}",
                        model_id, span->start(), span->end(),
                        announced.ToString());
        next_announce = now + absl::Seconds(2);
      }
    }
    sessions.CloseIdle(now);
    stop_signal = WaitForSignal(stop_signals, absl::Seconds(1));
  }

  // Withdraw first, so that clients route elsewhere while sessions drain.
  POLLEN_LOG_INFO("received {}, shutting down node {}", strsignal(stop_signal),
                  context.node_id);
  context.draining = true;
  const v1::NodeRecord offline =
      MakeRecord(context, address, v1::NODE_STATE_OFFLINE, 0, options.record_ttl);
  const absl::Status withdrawn = registry->Announce(offline, absl::Seconds(5));
  if (!withdrawn.ok()) {
    POLLEN_LOG_WARN("withdrawing records failed: {}", withdrawn.ToString());
  }
  server->Shutdown(std::chrono::system_clock::now() +
                   absl::ToChronoSeconds(options.drain_timeout));
  server->Wait();
  registry.reset();
  POLLEN_LOG_INFO("node {} stopped", context.node_id);
  return absl::OkStatus();
}

}  // namespace pollen::node
