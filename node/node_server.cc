#include "node/node_server.h"

#include <netdb.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <grpcpp/grpcpp.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/channel_pool.h"
#include "common/checkpoint.h"
#include "common/dht_registry.h"
#include "common/dtype.h"
#include "common/identity.h"
#include "common/logging.h"
#include "common/model_id.h"
#include "common/status_util.h"
#include "common/tensor_codec.h"
#include "node/announcer.h"
#include "node/block_service.h"
#include "node/block_span.h"
#include "node/next_hop_prober.h"
#include "node/session_manager.h"
#include "node/span_choice.h"
#include "node/span_mover.h"
#include "node/throughput.h"

namespace pollen::node {
namespace {

// How long streams that hold no session may go on after the drain.
constexpr absl::Duration kShutdownGrace = absl::Seconds(1);
// How long a stopping node waits for its cancelled calls to end.
constexpr absl::Duration kCallsEndTimeout = absl::Seconds(10);
// Maximum wait for the DHT to store the offline record at shutdown. Peers
// on loopback store it in milliseconds, and the record is advice: clients
// that miss it find the node gone and fail over.
constexpr absl::Duration kWithdrawTimeout = absl::Seconds(2);

absl::StatusOr<at::Device> ParseDevice(const std::string& name) {
  at::Device device(at::kCPU);
  try {
    device = at::Device(name);
  } catch (const c10::Error&) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown device '", name, "'; use cpu, cuda or cuda:N"));
  }
  if (device.is_cuda() && !at::hasCUDA()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--device ", name,
        ": this libtorch build has no CUDA support or sees no GPU; use "
        "--device cpu"));
  }
  return device;
}

}  // namespace

absl::Status ValidateNodeOptions(const NodeOptions& options) {
  if (options.cache_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cache-tokens must be positive, got ", options.cache_tokens));
  }
  if (options.prefill_chunk <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prefill-chunk must be positive, got ", options.prefill_chunk));
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
  if (options.num_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--num-blocks must be 0 (as many as fit) or positive, got ",
        options.num_blocks));
  }
  if (options.throughput < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--throughput must be 0 (measure) or positive, got ",
        options.throughput));
  }
  if (!(options.min_balance_gain >= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--min-balance-gain is a speed-up factor and must be at least 1 "
        "(1.25 moves for a slowest block 25% faster), got ",
        options.min_balance_gain));
  }
  if (options.threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--threads must be 0 (libtorch's default) or positive, got ",
        options.threads));
  }
  if (options.drain_timeout < absl::ZeroDuration() ||
      options.rebalance_period < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--drain-timeout-s and --rebalance-period-s must not be negative, got ",
        absl::FormatDuration(options.drain_timeout), " and ",
        absl::FormatDuration(options.rebalance_period)));
  }

  POLLEN_ASSIGN_OR_RETURN(const at::Device device, ParseDevice(options.device));
  const absl::StatusOr<at::ScalarType> dtype = ParseDtype(options.dtype);
  if (dtype.ok() && *dtype == at::kHalf && device.is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--dtype ", options.dtype,
        " needs a GPU: libtorch's CPU matrix products have no float16; on the "
        "CPU use float32 or bfloat16"));
  }

  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* addresses = nullptr;
  const int resolved =
      getaddrinfo(options.listen_host.c_str(), nullptr, &hints, &addresses);
  if (resolved != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--host '", options.listen_host, "' does not resolve (",
        gai_strerror(resolved), "); use an address of this machine, e.g. "
        "0.0.0.0 or 127.0.0.1"));
  }
  freeaddrinfo(addresses);
  return absl::OkStatus();
}

namespace {

// A stop signal that reached a thread not blocking it. OpenBLAS starts its
// thread pool while the program loads, before RunNode blocks the signals,
// and the kernel may hand a signal to that thread.
std::atomic<int> caught_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free,
              "the signal handler needs a lock-free atomic");

extern "C" void RecordStopSignal(int signal_number) {
  caught_stop_signal.store(signal_number);
}

// Waits up to `timeout` for SIGINT or SIGTERM. Returns the signal, or 0.
// A signal that RecordStopSignal caught counts too.
int WaitForSignal(const sigset_t& signals, absl::Duration timeout) {
  if (const int caught = caught_stop_signal.exchange(0); caught != 0) {
    return caught;
  }
  const timespec wait = absl::ToTimespec(timeout);
  const int signal_number = sigtimedwait(&signals, nullptr, &wait);
  if (signal_number > 0) return signal_number;
  return caught_stop_signal.exchange(0);
}

absl::StatusOr<std::unique_ptr<DhtRegistry>> JoinDht(
    const NodeOptions& options) {
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
  return registry;
}

absl::StatusOr<std::shared_ptr<const BlockSpan>> LoadSpan(
    const Checkpoint& checkpoint, int start, int end, at::ScalarType dtype,
    Quantization quantization, at::Device device) {
  const absl::Time started = absl::Now();
  POLLEN_ASSIGN_OR_RETURN(
      std::unique_ptr<BlockSpan> span,
      BlockSpan::Load(checkpoint, start, end, dtype, device, quantization));
  POLLEN_LOG_INFO("loaded blocks {}:{} ({:.1f} MiB of {}, quantization {}, "
                  "on {}) in {}",
                  start, end,
                  static_cast<double>(span->ParameterBytes()) / (1 << 20),
                  DtypeName(dtype), QuantizationName(quantization),
                  device.str(), absl::FormatDuration(absl::Now() - started));
  return std::shared_ptr<const BlockSpan>(std::move(span));
}

// Returns --throughput, a cached measurement, or a new one taken on `span`
// (or, when it is null, on block 0 loaded for the purpose) and cached.
absl::StatusOr<Throughput> ResolveThroughput(const NodeOptions& options,
                                             const Checkpoint& checkpoint,
                                             const std::string& model_id,
                                             at::ScalarType dtype,
                                             Quantization quantization,
                                             at::Device device,
                                             const BlockSpan* span) {
  if (options.throughput > 0) {
    Throughput announced;
    announced.decode_steps_per_s = options.throughput;
    POLLEN_LOG_INFO("announcing --throughput {} steps/s without measuring",
                    options.throughput);
    return announced;
  }

  // Read an earlier measurement.
  const std::string key =
      ThroughputCacheKey(model_id, checkpoint.config(), device, dtype,
                         quantization, at::get_num_threads());
  const std::string path = options.throughput_cache_path.empty()
                               ? DefaultThroughputCachePath()
                               : options.throughput_cache_path;
  if (!path.empty()) {
    const absl::StatusOr<Throughput> cached = ReadCachedThroughput(path, key);
    if (cached.ok()) {
      POLLEN_LOG_INFO("throughput from cache {}: {:.1f} decode steps/s, "
                      "{:.1f} prefill tokens/s",
                      path, cached->decode_steps_per_s,
                      cached->prefill_tokens_per_s);
      return *cached;
    }
    if (!absl::IsNotFound(cached.status())) {
      POLLEN_LOG_WARN("ignoring the throughput cache: {}",
                      cached.status().ToString());
    }
  }

  // Measure, on block 0 when no span is loaded yet.
  std::shared_ptr<const BlockSpan> probe;
  if (span == nullptr) {
    POLLEN_ASSIGN_OR_RETURN(
        probe, LoadSpan(checkpoint, 0, 1, dtype, quantization, device));
    span = probe.get();
  }
  const absl::Time started = absl::Now();
  POLLEN_ASSIGN_OR_RETURN(const Throughput measured, MeasureThroughput(*span));
  POLLEN_LOG_INFO("measured throughput of block {} in {}: {:.1f} decode "
                  "steps/s, {:.1f} prefill tokens/s",
                  span->start(), absl::FormatDuration(absl::Now() - started),
                  measured.decode_steps_per_s, measured.prefill_tokens_per_s);
  if (!path.empty()) {
    const absl::Status written = WriteCachedThroughput(path, key, measured);
    if (written.ok()) {
      POLLEN_LOG_INFO("saved the throughput to cache {}", path);
    } else {
      POLLEN_LOG_WARN("could not save the throughput: {}", written.ToString());
    }
  }
  return measured;
}

// Chooses the span when --blocks is absent and loads it.
absl::StatusOr<std::shared_ptr<const BlockSpan>> ChooseAndLoadSpan(
    const NodeOptions& options, const Checkpoint& checkpoint,
    const std::string& model_id, at::ScalarType dtype,
    Quantization quantization, at::Device device, DhtRegistry& registry,
    double throughput, std::mt19937_64& rng) {
  const ModelConfig& config = checkpoint.config();
  std::string length_reason;
  POLLEN_ASSIGN_OR_RETURN(
      const int length,
      ChooseSpanLength(options.num_blocks, config, dtype, quantization, device,
                       options.cache_tokens, &length_reason));
  POLLEN_LOG_INFO("serving {} of {}'s {} blocks: {}", length, model_id,
                  config.num_hidden_layers, length_reason);
  POLLEN_ASSIGN_OR_RETURN(
      const v1::BlockRange range,
      ChooseInitialSpan(registry, model_id, registry.node_id(),
                        static_cast<int>(config.num_hidden_layers), length,
                        throughput, rng));
  return LoadSpan(checkpoint, static_cast<int>(range.start()),
                  static_cast<int>(range.end()), dtype, quantization, device);
}

// Returns UNAVAILABLE when another socket is bound to TCP port `port` of
// `host`, found by binding a socket there the way gRPC's server does. So a node
// started on a taken port fails before it loads anything, with one clear
// line instead of gRPC's own error dump. A host that does not resolve
// passes, because ValidateNodeOptions reports it.
absl::Status CheckPortFree(const std::string& host, int port) {
  if (port == 0) return absl::OkStatus();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* addresses = nullptr;
  const std::string service = std::to_string(port);
  if (getaddrinfo(host.c_str(), service.c_str(), &hints, &addresses) != 0) {
    return absl::OkStatus();
  }

  int bind_errno = 0;
  for (addrinfo* address = addresses; address != nullptr && bind_errno == 0;
       address = address->ai_next) {
    const int fd =
        socket(address->ai_family, address->ai_socktype, address->ai_protocol);
    if (fd < 0) continue;
    const int on = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    if (bind(fd, address->ai_addr, address->ai_addrlen) != 0 &&
        errno == EADDRINUSE) {
      bind_errno = errno;
    }
    close(fd);
  }
  freeaddrinfo(addresses);
  if (bind_errno == 0) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "cannot listen on ", host, ":", port, ": ", std::strerror(bind_errno),
      "; pick another port with --port"));
}

// Starts the server and the loop that runs its calls, with `service`
// accepting calls.
absl::StatusOr<std::unique_ptr<CallLoop>> StartServer(
    const NodeOptions& options, BlockServiceImpl& service, int* bound_port) {
  grpc::ServerBuilder builder;
  const std::string listen_address =
      absl::StrCat(options.listen_host, ":", options.port);
  builder.AddListeningPort(listen_address, grpc::InsecureServerCredentials(),
                           bound_port);
  // gRPC sets SO_REUSEPORT by default, which lets a second node bind the
  // same port and receive half of the connections.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             5000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // No bandwidth-delay probe pings, which cost a wakeup per step; a fixed
  // 16 MiB stream window replaces the window they would grow.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::ServerCompletionQueue> queue =
      builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *bound_port == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", listen_address,
        "; is the port in use? Pick another with --port"));
  }
  auto loop = std::make_unique<CallLoop>(std::move(server), std::move(queue));
  service.StartAccepting(loop.get());
  loop->Start();
  return loop;
}

// Accepts a push target when a node that is not offline announced `block`
// of `model_id` at that address. The next-hop prober's last records decide
// at once for the block after the span (when `prober` points to a prober),
// and otherwise a DHT lookup of at most kTargetLookup, which ends at the
// first record that matches.
PushTargetCheck AnnouncedTargetCheck(
    DhtRegistry* registry, std::string model_id,
    const std::atomic<const NextHopProber*>* prober) {
  constexpr absl::Duration kTargetLookup = absl::Seconds(5);
  return [registry, model_id = std::move(model_id), prober](
             const std::string& address, int block) -> absl::Status {
    const NextHopProber* known = prober->load();
    if (known != nullptr && known->Announced(address, block)) {
      return absl::OkStatus();
    }
    const absl::Status found =
        registry->FindBlockServer(model_id, block, address, kTargetLookup);
    if (absl::IsNotFound(found)) {
      return absl::PermissionDeniedError(found.message());
    }
    return found;
  };
}

// Announces, refreshes and reaps idle sessions until a stop signal arrives,
// and returns the signal.
int ServeUntilSignal(const NodeOptions& options, const sigset_t& stop_signals,
                     Announcer& announcer, SessionManager& sessions,
                     const ServiceContext& context) {
  absl::Time next_announce = absl::InfinitePast();
  // The first look does not wait, so that a signal that came during
  // startup stops the node before it announces itself online.
  absl::Duration wait = absl::ZeroDuration();
  while (true) {
    const int stop_signal = WaitForSignal(stop_signals, wait);
    if (stop_signal != 0) return stop_signal;
    wait = absl::Seconds(1);

    const absl::Time now = absl::Now();
    if (now >= next_announce) {
      const absl::Status announced =
          announcer.Announce(v1::NODE_STATE_ONLINE, absl::Seconds(10));
      if (announced.ok()) {
        POLLEN_LOG_DEBUG("announced {}", context.model_id);
        next_announce = now + options.announce_period;
      } else {
        POLLEN_LOG_WARN("announce of {} failed, retrying in 2s: {}",
                        context.model_id, announced.ToString());
        next_announce = now + absl::Seconds(2);
      }
    }
    sessions.CloseIdle(now);
  }
}

// Lets open sessions finish: waits until none is left, the drain timeout
// passes or another stop signal arrives.
void DrainSessions(const NodeOptions& options, const sigset_t& stop_signals,
                   SessionManager& sessions) {
  const absl::Time deadline = absl::Now() + options.drain_timeout;
  int open = sessions.open_sessions();
  if (open > 0) {
    POLLEN_LOG_INFO("draining {} open session{} for up to {}", open,
                    open == 1 ? "" : "s",
                    absl::FormatDuration(options.drain_timeout));
  }
  while (open > 0) {
    if (absl::Now() >= deadline) {
      POLLEN_LOG_WARN("drain timeout of {} passed with {} sessions open; "
                      "cancelling them",
                      absl::FormatDuration(options.drain_timeout), open);
      return;
    }
    const int stop_signal = WaitForSignal(stop_signals, absl::Milliseconds(100));
    if (stop_signal != 0) {
      POLLEN_LOG_WARN("received {} while draining; cancelling {} sessions",
                      strsignal(stop_signal), open);
      return;
    }
    sessions.CloseIdle(absl::Now());
    open = sessions.open_sessions();
  }
}

}  // namespace

absl::Status RunNode(const NodeOptions& options) {
  // Block the stop signals in this thread before it starts any other, so
  // that those inherit the mask and sigtimedwait receives the signals. The
  // handler catches them in threads that started earlier.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  struct sigaction record_stop = {};
  record_stop.sa_handler = RecordStopSignal;
  sigemptyset(&record_stop.sa_mask);
  sigaction(SIGINT, &record_stop, nullptr);
  sigaction(SIGTERM, &record_stop, nullptr);

  POLLEN_RETURN_IF_ERROR(ValidateNodeOptions(options));
  POLLEN_RETURN_IF_ERROR(CheckPortFree(options.listen_host, options.port));
  POLLEN_ASSIGN_OR_RETURN(const at::ScalarType dtype, ParseDtype(options.dtype));
  POLLEN_ASSIGN_OR_RETURN(const Quantization quantization,
                          ParseQuantization(options.quantization));
  POLLEN_ASSIGN_OR_RETURN(const at::Device device, ParseDevice(options.device));
  if (options.threads > 0) at::set_num_threads(options.threads);
  const uint64_t seed =
      options.seed != 0 ? options.seed : std::random_device()();
  std::mt19937_64 rng(seed);

  POLLEN_ASSIGN_OR_RETURN(std::shared_ptr<const Checkpoint> checkpoint,
                          Checkpoint::Open(options.model_dir));
  const std::string model_id = options.model_id.empty()
                                   ? DefaultModelId(options.model_dir)
                                   : options.model_id;

  // A given span loads before the DHT starts, so that a bad checkpoint or
  // range fails at once.
  std::shared_ptr<const BlockSpan> span;
  if (options.block_end > 0) {
    if (options.num_blocks > 0) {
      POLLEN_LOG_INFO("--blocks {}:{} given; ignoring --num-blocks {}",
                      options.block_start, options.block_end,
                      options.num_blocks);
    }
    POLLEN_ASSIGN_OR_RETURN(
        span, LoadSpan(*checkpoint, options.block_start, options.block_end,
                       dtype, quantization, device));
  }
  POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<DhtRegistry> registry,
                          JoinDht(options));
  POLLEN_ASSIGN_OR_RETURN(
      const Throughput throughput,
      ResolveThroughput(options, *checkpoint, model_id, dtype, quantization,
                        device, span.get()));
  if (span == nullptr) {
    POLLEN_LOG_INFO("no --blocks given; choosing a span (seed {})", seed);
    POLLEN_ASSIGN_OR_RETURN(
        span, ChooseAndLoadSpan(options, *checkpoint, model_id, dtype,
                                quantization, device, *registry,
                                throughput.decode_steps_per_s, rng));
  }

  // Start serving. The mover is created after the server, so MoveBlocks
  // calls that arrive before it exists get UNAVAILABLE.
  SessionLimits limits;
  limits.cache_token_budget = options.cache_tokens;
  limits.idle_timeout = options.session_idle_timeout;
  limits.prefill_chunk_tokens = options.prefill_chunk;
  SessionManager sessions(limits);

  std::atomic<SpanMover*> mover_slot{nullptr};
  ServiceContext context;
  context.model_id = model_id;
  context.node_id = registry->node_id();
  context.public_name = options.public_name;
  context.config = checkpoint->config();
  context.spans.Set(span);
  context.sessions = &sessions;
  context.move_blocks = [&mover_slot](int start, int end,
                                      SpanMover::MoveDone done) {
    SpanMover* mover = mover_slot.load();
    if (mover == nullptr) {
      done(absl::UnavailableError("node is still starting; retry shortly"));
      return;
    }
    mover->RequestMove(start, end, std::move(done));
  };
  std::atomic<const NextHopProber*> prober_slot{nullptr};
  context.pusher.SetTargetCheck(
      AnnouncedTargetCheck(registry.get(), model_id, &prober_slot));
  BlockServiceImpl service(&context);
  int bound_port = 0;
  POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<CallLoop> calls,
                          StartServer(options, service, &bound_port));
  context.pusher.SetCallLoop(calls.get());
  const std::string address = absl::StrCat(options.announce_host, ":", bound_port);

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
  span.reset();  // the service and its sessions own spans from here on

  // Background work: next-hop RTTs and moves.
  NextHopProber prober(registry.get(), &context, options.announce_period);
  prober_slot = &prober;
  // The pusher's checker reads the prober, so it stops first on every path.
  absl::Cleanup stop_pushes = [&context] { context.pusher.Shutdown(); };
  RecordInfo info;
  info.address = address;
  info.throughput = throughput;
  info.device = device.str();
  info.dtype = DtypeName(dtype);
  info.quantization =
      quantization == Quantization::kNone ? "" : QuantizationName(quantization);
  info.record_ttl = options.record_ttl;
  info.public_name = options.public_name.empty() ? address : options.public_name;
  Announcer announcer(registry.get(), &context, &prober, info);

  MoverOptions mover_options;
  mover_options.rebalance_period = options.rebalance_period;
  mover_options.min_balance_gain = options.min_balance_gain;
  mover_options.drain_timeout = options.drain_timeout;
  mover_options.seed = seed + 1;
  MoverTargets targets;
  targets.checkpoint = checkpoint;
  targets.dtype = dtype;
  targets.quantization = quantization;
  targets.device = device;
  targets.throughput = throughput.decode_steps_per_s;
  targets.service = &context;
  targets.sessions = &sessions;
  targets.announcer = &announcer;
  targets.registry = registry.get();
  SpanMover mover(mover_options, targets);
  mover_slot = &mover;
  prober.Start();
  mover.Start();

  const int stop_signal =
      ServeUntilSignal(options, stop_signals, announcer, sessions, context);

  // Withdraw first, so that clients route elsewhere while sessions drain.
  POLLEN_LOG_INFO("received {}, shutting down node {}", strsignal(stop_signal),
                  context.node_id);
  context.draining = true;
  mover.Stop();
  mover_slot = nullptr;
  // The offline record goes out while the sessions drain, so that a DHT
  // whose peers are gone delays the stop by the longer of the two, not by
  // their sum.
  std::thread withdraw([&announcer, &options, &context] {
    const absl::Status withdrawn =
        announcer.Announce(v1::NODE_STATE_OFFLINE, kWithdrawTimeout);
    if (!withdrawn.ok()) {
      // Usually a peer that left the DHT recently and does not reply.
      POLLEN_LOG_WARN(
          "node {}: the offline record did not reach every DHT peer: {}; "
          "clients that still see this node online fail over, and its "
          "records expire within {}",
          context.node_id, withdrawn.ToString(),
          absl::FormatDuration(options.record_ttl));
    }
  });
  DrainSessions(options, stop_signals, sessions);
  withdraw.join();
  prober.Stop();
  context.pusher.Shutdown();

  // Calls still open are cancelled after the grace. Their reactors, and
  // training jobs still queued, end on the loop before its queue shuts.
  calls->ShutdownServer(kShutdownGrace);
  context.compute.Stop();
  calls->Stop(kCallsEndTimeout);
  // A pass may still be returning from its last step's callback, and it
  // reads the context, which is destroyed before the sessions.
  sessions.batcher().WaitIdle();
  registry.reset();
  POLLEN_LOG_INFO("node {} stopped", context.node_id);
  return absl::OkStatus();
}

}  // namespace pollen::node
