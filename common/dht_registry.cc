#include "common/dht_registry.h"

#include <algorithm>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <random>
#include <tuple>
#include <utility>

#include <opendht/callbacks.h>
#include <opendht/dhtrunner.h>
#include <opendht/infohash.h>
#include <opendht/log_enable.h>
#include <opendht/sockaddr.h>
#include <opendht/value.h>

#include "absl/memory/memory.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dht_udp_socket.h"
#include "common/identity.h"
#include "common/logging.h"
#include "common/peer_address.h"
#include "common/status_util.h"

namespace pollen {
namespace {

using pollen::v1::NodeRecord;

// OpenDHT nodes exchange messages only with nodes of the same network id, so a
// Pollen swarm never mixes with the public OpenDHT network or another protocol
// version. The bytes spell "PLN" and the protocol version 1.
constexpr dht::NetId kNetworkId = 0x504c4e01;

// How long a peer keeps a stored record without a refresh. The announcing
// node's runner refreshes its values before this runs out, so this only
// bounds how long a crashed node's records stay in storage. Clients go by
// the record's own expires_ms.
constexpr auto kRecordStorageTime = std::chrono::minutes(2);

// Most blocks one record may announce, which bounds the puts per Announce.
constexpr int64_t kMaxBlocksPerRecord = 1024;

// Rejected values logged one by one per fetched key; the rest are counted.
constexpr int kMaxRejectLogsPerKey = 3;

// Lookups one fetch keeps in flight, because the replies to a burst of
// lookups can overflow the UDP receive buffer and OpenDHT resends after a
// second. In the 32-block LargeSwarmTest on loopback (2 shared CPU cores),
// with the buffer at the usual Linux default of 208 KiB, 8 in flight caused
// no drops and 32 did.
constexpr size_t kMaxParallelGets = 8;

// Minimum time between two pings by NudgeIfConnecting().
constexpr absl::Duration kNudgeInterval = absl::Seconds(1);

// Observed with OpenDHT 2.4.12: now and then the runner thread sleeps for
// about a second while a received packet waits in its queue, then logs
// "Dropped 1 packets with high delay". This looks like a missed wakeup, so
// waits for the DHT wake the runner at this interval.
constexpr absl::Duration kWakeInterval = absl::Milliseconds(50);

// Stores only signed values of bounded size. SecureDht wraps this policy so
// that a signed value must also carry a valid signature, and only its owner
// may replace it with a higher sequence number.
dht::ValueType NodeRecordType() {
  return dht::ValueType(
      kNodeRecordValueType, "pollen.v1.NodeRecord", kRecordStorageTime,
      [](dht::InfoHash, std::shared_ptr<dht::Value>& value,
         const dht::InfoHash&, const dht::SockAddr&) {
        return value->isSigned() && value->data.size() <= kMaxRecordBytes;
      });
}

// Sends OpenDHT's errors and warnings to the debug log, because OpenDHT
// reports routine events, such as a search that found no nodes yet, as
// errors. Its per-packet debug messages are left out.
std::shared_ptr<dht::Logger> MakeOpenDhtLogger() {
  auto log = [](const char* format, va_list args) {
    char buffer[1024];
    vsnprintf(buffer, sizeof(buffer), format, args);
    POLLEN_LOG_DEBUG("opendht: {}", buffer);
  };
  return std::make_shared<dht::Logger>(dht::LogMethod(log), dht::LogMethod(log),
                                       dht::LogMethod());
}

uint64_t RandomValueId() {
  std::random_device device;
  std::uniform_int_distribution<uint64_t> distribution(
      1, std::numeric_limits<uint64_t>::max());
  return distribution(device);
}

std::string SpanString(const NodeRecord& record) {
  return absl::StrCat("[", record.blocks().start(), ", ", record.blocks().end(),
                      ")");
}

absl::Status ValidateForAnnounce(const NodeRecord& record,
                                 const std::string& node_id) {
  if (record.node_id() != node_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        "record.node_id '", record.node_id(), "' is not this node's id '",
        node_id, "'; set it to DhtRegistry::node_id()"));
  }
  if (record.model_id().empty()) {
    return absl::InvalidArgumentError("record.model_id is empty");
  }
  const int64_t start = record.blocks().start();
  const int64_t end = record.blocks().end();
  if (start >= end) {
    return absl::InvalidArgumentError(
        absl::StrCat("record.blocks ", SpanString(record), " of model ",
                     record.model_id(), " is empty"));
  }
  if (end - start > kMaxBlocksPerRecord || end > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "record.blocks ", SpanString(record), " of model ", record.model_id(),
        " spans more than ", kMaxBlocksPerRecord,
        " blocks or ends past the largest block index"));
  }
  return absl::OkStatus();
}

// The value's signer as a node id, or "(unsigned)".
std::string OwnerOf(const dht::Value& value) {
  if (!value.owner) return "(unsigned)";
  return value.owner->getId().toString();
}

// Stores `record` under `key` in `by_key` unless the record there has the
// same or a newer announced_ms.
template <typename Key>
void KeepNewest(std::map<Key, NodeRecord>& by_key, Key key, NodeRecord record) {
  auto [it, inserted] = by_key.try_emplace(std::move(key), record);
  if (!inserted && record.announced_ms() > it->second.announced_ms()) {
    it->second = std::move(record);
  }
}

// Moves the records out of `by_key`, in key order.
template <typename Key>
std::vector<NodeRecord> TakeRecords(std::map<Key, NodeRecord>& by_key) {
  std::vector<NodeRecord> records;
  records.reserve(by_key.size());
  for (auto& [key, record] : by_key) records.push_back(std::move(record));
  return records;
}

// Puts of one value under several keys, completed by the DHT thread.
struct PutBatch {
  absl::Mutex mu;
  int remaining ABSL_GUARDED_BY(mu) = 0;
  int failed ABSL_GUARDED_BY(mu) = 0;
};

// Hands the puts of `value` under `keys` to `runner` without waiting.
std::shared_ptr<PutBatch> StartPuts(dht::DhtRunner& runner,
                                    const std::vector<std::string>& keys,
                                    const std::shared_ptr<dht::Value>& value) {
  auto batch = std::make_shared<PutBatch>();
  {
    absl::MutexLock lock(&batch->mu);
    batch->remaining = static_cast<int>(keys.size());
  }
  for (const std::string& key : keys) {
    // The callback may run after the caller stopped waiting, so it shares
    // ownership of the batch.
    runner.put(dht::InfoHash::get(key), value,
               dht::DoneCallbackSimple([batch](bool ok) {
                 absl::MutexLock lock(&batch->mu);
                 --batch->remaining;
                 if (!ok) ++batch->failed;
               }));
  }
  return batch;
}

// Waits until `done`, evaluated under `mu`, returns true or `deadline`
// passes, and wakes `runner` every kWakeInterval meanwhile. `mu` must not be
// held by the caller. Returns whether `done` became true.
bool AwaitWithWakeups(dht::DhtRunner& runner, absl::Mutex& mu,
                      const std::function<bool()>& done, absl::Time deadline) {
  while (true) {
    {
      absl::MutexLock lock(&mu);
      if (mu.AwaitWithDeadline(
              absl::Condition(&done),
              std::min(deadline, absl::Now() + kWakeInterval))) {
        return true;
      }
    }
    if (absl::Now() >= deadline) return false;

    // An empty bootstrap list queues an operation that does nothing, which
    // makes the runner thread look at its queues again.
    runner.bootstrap(std::vector<dht::NodeExport>{});
  }
}

// Waits until `deadline` for the puts of `batch` and returns how many no
// peer stored, or DEADLINE_EXCEEDED when some did not finish.
absl::StatusOr<int> AwaitPuts(dht::DhtRunner& runner, PutBatch& batch,
                              size_t count, absl::Time deadline,
                              absl::Duration timeout) {
  const bool finished = AwaitWithWakeups(
      runner, batch.mu,
      [&batch]()
          ABSL_NO_THREAD_SAFETY_ANALYSIS { return batch.remaining == 0; },
      deadline);

  absl::MutexLock lock(&batch.mu);
  if (!finished) {
    return absl::DeadlineExceededError(absl::StrCat(
        batch.remaining, " of ", count, " DHT puts did not finish within ",
        absl::FormatDuration(timeout)));
  }
  return batch.failed;
}

// Returns whether `record` is of `model_id` and covers `block`, as every
// record under that block's key must be (see ValidRecords).
bool BelongsUnderBlock(const NodeRecord& record, const std::string& model_id,
                       int64_t block) {
  return record.model_id() == model_id &&
         block >= static_cast<int64_t>(record.blocks().start()) &&
         block < static_cast<int64_t>(record.blocks().end());
}

}  // namespace

std::string BlockKey(const std::string& model_id, int block) {
  return absl::StrCat("pollen/v1/", model_id, "/block/", block);
}

std::string ModelIndexKey() { return "pollen/v1/models"; }

absl::StatusOr<NodeRecord> ParseRecordValue(const dht::Value& value,
                                            absl::Time now) {
  const std::string value_id = absl::StrCat(absl::Hex(value.id));

  if (value.type != kNodeRecordValueType) {
    return absl::InvalidArgumentError(
        absl::StrCat("value ", value_id, " has type ", value.type,
                     ", not the NodeRecord type ", kNodeRecordValueType));
  }
  if (!value.isSigned()) {
    return absl::UnauthenticatedError(
        absl::StrCat("value ", value_id, " is not signed"));
  }

  // checkSignature() reports malformed keys by throwing.
  bool signature_valid = false;
  try {
    signature_valid = value.checkSignature();
  } catch (const std::exception&) {
    signature_valid = false;
  }
  if (!signature_valid) {
    return absl::UnauthenticatedError(
        absl::StrCat("signature of value ", value_id, " by ", OwnerOf(value),
                     " does not verify"));
  }

  NodeRecord record;
  if (value.data.size() > kMaxRecordBytes ||
      !record.ParseFromArray(value.data.data(),
                             static_cast<int>(value.data.size()))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "payload of value ", value_id, " (", value.data.size(),
        " bytes) is not a NodeRecord of at most ", kMaxRecordBytes, " bytes"));
  }

  const std::string owner = OwnerOf(value);
  if (record.node_id() != owner) {
    return absl::UnauthenticatedError(
        absl::StrCat("record in value ", value_id, " claims node id '",
                     record.node_id(), "' but is signed by ", owner));
  }
  if (record.model_id().empty() ||
      record.blocks().start() >= record.blocks().end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("record of node ", owner, " has model '",
                     record.model_id(), "' and blocks ", SpanString(record),
                     "; expected a model id and a non-empty block range"));
  }

  const int64_t now_ms = absl::ToUnixMillis(now);
  if (record.expires_ms() <= now_ms) {
    return absl::FailedPreconditionError(
        absl::StrCat("record of node ", owner, " expired at ",
                     record.expires_ms(), " ms, now is ", now_ms, " ms"));
  }
  return record;
}

DhtRegistry::DhtRegistry(std::vector<std::string> bootstrap,
                         dht::crypto::Identity identity)
    : bootstrap_(std::move(bootstrap)),
      identity_(std::move(identity)),
      node_id_(NodeIdOf(identity_)),
      runner_(std::make_unique<dht::DhtRunner>()) {}

absl::StatusOr<std::unique_ptr<DhtRegistry>> DhtRegistry::Start(
    const DhtOptions& options) {
  // Check the options before binding anything.
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("DHT port ", options.port, " is outside [0, 65535]"));
  }
  const dht::crypto::Identity& identity = options.identity;
  if (static_cast<bool>(identity.first) != static_cast<bool>(identity.second)) {
    return absl::InvalidArgumentError(
        "DHT identity has only one of its private key and certificate");
  }
  if (identity.first &&
      identity.first->getPublicKey().getId() != identity.second->getId()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DHT identity certificate is for key ",
        identity.second->getId().toString(), ", not for its private key ",
        identity.first->getPublicKey().getId().toString()));
  }
  std::vector<std::pair<std::string, std::string>> peers;
  for (const std::string& address : options.bootstrap) {
    POLLEN_ASSIGN_OR_RETURN(auto peer, SplitPeerAddress(address));
    peers.push_back(std::move(peer));
  }

  std::unique_ptr<DhtRegistry> registry =
      absl::WrapUnique(new DhtRegistry(options.bootstrap, identity));

  // NOTE: binds IPv4 only, which loopback and LAN swarms need. A host
  // reachable only over IPv6 cannot join.
  POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<DhtUdpSocket> socket,
                          DhtUdpSocket::Open(options.port));

  dht::DhtRunner::Config config;
  config.dht_config.node_config.network = kNetworkId;
  // OpenDHT limits requests per source address. Every peer of a local swarm
  // shares 127.0.0.1, and the limit dropped requests during announcements
  // of 80 blocks by eight loopback nodes, so only the global limit stays.
  config.dht_config.node_config.max_peer_req_per_sec = -1;
  config.dht_config.id = identity;
  config.threaded = true;

  dht::DhtRunner::Context context;
  context.sock = std::move(socket);
  if (spdlog::should_log(spdlog::level::debug)) {
    context.logger = MakeOpenDhtLogger();
  }
  DhtRegistry* self = registry.get();
  context.statusChangedCallback = [self](dht::NodeStatus ipv4,
                                         dht::NodeStatus ipv6) {
    const dht::NodeStatus status = std::max(ipv4, ipv6);
    self->OnStatusChanged(
        status == dht::NodeStatus::Connected    ? PeerStatus::kConnected
        : status == dht::NodeStatus::Connecting ? PeerStatus::kConnecting
                                                : PeerStatus::kDisconnected);
  };

  try {
    registry->runner_->run(config, std::move(context));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(
        "failed to start the DHT on UDP port ", options.port, ": ", e.what()));
  }
  registry->runner_->registerType(NodeRecordType());
  for (const auto& [host, port] : peers) {
    registry->runner_->bootstrap(host, port);
  }

  POLLEN_LOG_INFO(
      "DHT started on UDP port {} (node id {}, bootstrap {})", registry->port(),
      registry->node_id_.empty() ? "none, read-only" : registry->node_id_,
      registry->BootstrapList());
  return registry;
}

DhtRegistry::~DhtRegistry() {
  runner_->join();
  POLLEN_LOG_INFO("DHT stopped (node id {})",
                  node_id_.empty() ? "none" : node_id_);
}

int DhtRegistry::port() const { return runner_->getBoundPort(AF_INET); }

std::string DhtRegistry::BootstrapList() const {
  return bootstrap_.empty() ? "none, new swarm"
                            : absl::StrJoin(bootstrap_, ", ");
}

void DhtRegistry::OnStatusChanged(PeerStatus status) {
  PeerStatus previous;
  {
    absl::MutexLock lock(&status_mu_);
    previous = status_;
    status_ = status;
  }
  if (status == previous) return;

  if (status == PeerStatus::kConnected) {
    POLLEN_LOG_INFO("DHT connected (node id {})",
                    node_id_.empty() ? "none" : node_id_);
  } else if (previous == PeerStatus::kConnected) {
    POLLEN_LOG_WARN("DHT lost its peers (node id {}, bootstrap {})",
                    node_id_.empty() ? "none" : node_id_, BootstrapList());
  }
}

void DhtRegistry::NudgeIfConnecting() {
  {
    absl::MutexLock lock(&status_mu_);
    if (status_ != PeerStatus::kConnecting) return;
    const absl::Time now = absl::Now();
    if (now - last_nudge_ < kNudgeInterval) return;
    last_nudge_ = now;
  }
  POLLEN_LOG_DEBUG("DHT peers unconfirmed; pinging them again");
  runner_->connectivityChanged();
}

bool DhtRegistry::IsAloneInNewSwarm() const {
  if (!bootstrap_.empty()) return false;
  absl::MutexLock lock(&status_mu_);
  return status_ != PeerStatus::kConnected;
}

absl::Status DhtRegistry::WaitConnected(absl::Duration timeout) {
  if (bootstrap_.empty()) return absl::OkStatus();

  const absl::Time deadline = absl::Now() + timeout;
  auto connected = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(status_mu_) {
    return status_ == PeerStatus::kConnected;
  };
  while (true) {
    NudgeIfConnecting();
    {
      absl::MutexLock lock(&status_mu_);
      status_mu_.AwaitWithDeadline(
          absl::Condition(&connected),
          std::min(deadline, absl::Now() + kWakeInterval));
      if (connected()) return absl::OkStatus();
    }
    runner_->bootstrap(std::vector<dht::NodeExport>{});
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "no DHT peer responded within ", absl::FormatDuration(timeout),
          "; bootstrap peers: ", BootstrapList(),
          ". Check that a Pollen node listens there on UDP"));
    }
  }
}

absl::Status DhtRegistry::Announce(const NodeRecord& record,
                                   absl::Duration timeout) {
  if (!identity_.first) {
    return absl::FailedPreconditionError(
        "cannot announce without an identity; start the DHT registry with "
        "DhtOptions.identity set");
  }
  POLLEN_RETURN_IF_ERROR(ValidateForAnnounce(record, node_id_));
  const std::string payload = record.SerializeAsString();
  if (payload.size() > kMaxRecordBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "record of model ", record.model_id(), " is ", payload.size(),
        " bytes, more than the limit of ", kMaxRecordBytes));
  }

  const std::string& model_id = record.model_id();
  const int start = static_cast<int>(record.blocks().start());
  const int end = static_cast<int>(record.blocks().end());
  std::vector<std::string> keys;
  for (int block = start; block < end; ++block) {
    keys.push_back(BlockKey(model_id, block));
  }
  keys.push_back(ModelIndexKey());

  const absl::Time deadline = absl::Now() + timeout;
  const absl::Status connected = WaitConnected(timeout);
  if (!connected.ok()) {
    return absl::Status(connected.code(),
                        absl::StrCat("announce of model ", model_id, ": ",
                                     connected.message()));
  }
  NudgeIfConnecting();

  // Keys of blocks that left the span since the last announcement. The new
  // record replaces the old one in peers' storage there too. Clients reject
  // it under those keys because it no longer covers the block.
  std::vector<std::string> dropped_keys;
  std::shared_ptr<PutBatch> batch;
  auto value = std::make_shared<dht::Value>(
      kNodeRecordValueType, dht::Blob(payload.begin(), payload.end()));
  {
    absl::MutexLock lock(&announce_mu_);
    ModelAnnouncement& announcement = announcements_[model_id];

    // Peers replace a stored value only by one with the same id and a higher
    // sequence number. A new id is drawn per model and process, so that a
    // restarted node never competes with its old values, and again when the
    // 16-bit sequence number runs out. Values under the old id stay in
    // storage until they expire, and clients keep the newer record.
    const bool new_id =
        announcement.value_id == 0 ||
        announcement.seq == std::numeric_limits<uint16_t>::max();
    if (new_id) {
      for (int block = announcement.start; block < announcement.end; ++block) {
        runner_->cancelPut(dht::InfoHash::get(BlockKey(model_id, block)),
                           announcement.value_id);
      }
      if (announcement.value_id != 0) {
        runner_->cancelPut(dht::InfoHash::get(ModelIndexKey()),
                           announcement.value_id);
      }
      announcement.value_id = RandomValueId();
      announcement.seq = 0;
    } else {
      ++announcement.seq;
      for (int block = announcement.start; block < announcement.end; ++block) {
        if (block < start || block >= end) {
          dropped_keys.push_back(BlockKey(model_id, block));
        }
      }
    }
    announcement.start = start;
    announcement.end = end;

    value->id = announcement.value_id;
    value->seq = announcement.seq;
    try {
      value->sign(*identity_.first);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat(
          "failed to sign the record of model ", model_id, ": ", e.what()));
    }

    // Handing the puts to the runner under the lock keeps them in sequence
    // order. The wait for peers happens after the lock is released.
    keys.insert(keys.end(), dropped_keys.begin(), dropped_keys.end());
    batch = StartPuts(*runner_, keys, value);
  }

  const std::string what =
      absl::StrCat("model ", model_id, " blocks ", SpanString(record), " (",
                   pollen::v1::NodeState_Name(record.state()), ", ",
                   keys.size(), " keys, node id ", node_id_, ")");
  // With no peer to store them, the puts could only time out.
  const bool alone = IsAloneInNewSwarm();
  absl::StatusOr<int> failed = 0;
  if (!alone) failed = AwaitPuts(*runner_, *batch, keys.size(), deadline, timeout);
  for (const std::string& key : dropped_keys) {
    runner_->cancelPut(dht::InfoHash::get(key), value->id);
  }
  if (alone || (failed.ok() && *failed > 0 && IsAloneInNewSwarm())) {
    POLLEN_LOG_INFO(
        "Announced {} in local storage only, because no peer is in this "
        "new swarm now",
        what);
    return absl::OkStatus();
  }

  if (!failed.ok()) {
    POLLEN_LOG_WARN("DHT announce of {} failed: {}", what,
                    failed.status().ToString());
    return absl::Status(
        failed.status().code(),
        absl::StrCat("announce of ", what, ": ", failed.status().message()));
  }
  if (*failed > 0) {
    const std::string message = absl::StrCat(
        "announce of ", what, ": no DHT peer stored ", *failed, " of ",
        keys.size(), " values; bootstrap peers: ", BootstrapList());
    POLLEN_LOG_WARN("{}", message);
    return absl::UnavailableError(message);
  }
  POLLEN_LOG_INFO("Announced {}", what);
  return absl::OkStatus();
}

absl::Status DhtRegistry::PutValueForTesting(const std::string& key,
                                             std::shared_ptr<dht::Value> value,
                                             absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  POLLEN_RETURN_IF_ERROR(WaitConnected(timeout));
  NudgeIfConnecting();
  std::shared_ptr<PutBatch> batch = StartPuts(*runner_, {key}, value);
  return AwaitPuts(*runner_, *batch, 1, deadline, timeout).status();
}

absl::Status DhtRegistry::GetValues(std::vector<KeyValues>& keys,
                                    absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  POLLEN_RETURN_IF_ERROR(WaitConnected(timeout));

  struct GetBatch {
    absl::Mutex mu;
    std::vector<std::vector<std::shared_ptr<dht::Value>>> values
        ABSL_GUARDED_BY(mu);
    std::vector<bool> done ABSL_GUARDED_BY(mu);
    size_t finished ABSL_GUARDED_BY(mu) = 0;
    // Set when a value satisfied its key's `enough`.
    bool satisfied ABSL_GUARDED_BY(mu) = false;
  };
  auto batch = std::make_shared<GetBatch>();
  {
    absl::MutexLock lock(&batch->mu);
    batch->values.resize(keys.size());
    batch->done.assign(keys.size(), false);
  }

  NudgeIfConnecting();
  size_t started = 0;
  const std::function<bool()> window_open =
      [&batch, &started]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return started - batch->finished < kMaxParallelGets;
      };
  while (started < keys.size()) {
    if (!AwaitWithWakeups(*runner_, batch->mu, window_open, deadline)) break;

    // The callbacks run on the DHT thread and may outlive this call when it
    // times out, so they share ownership of the batch and never touch `keys`.
    // The runner is called without holding batch->mu, which the callbacks
    // take.
    const size_t i = started++;
    runner_->get(
        dht::InfoHash::get(keys[i].key),
        dht::GetCallback(
            [batch, i, enough = keys[i].enough](
                const std::vector<std::shared_ptr<dht::Value>>& found) {
              bool satisfied = false;
              if (enough) {
                for (const std::shared_ptr<dht::Value>& value : found) {
                  satisfied = satisfied || enough(*value);
                }
              }
              absl::MutexLock lock(&batch->mu);
              auto& values = batch->values[i];
              values.insert(values.end(), found.begin(), found.end());
              batch->satisfied = batch->satisfied || satisfied;
              // Returning false ends this key's lookup.
              return !satisfied;
            }),
        dht::DoneCallbackSimple([batch, i](bool) {
          absl::MutexLock lock(&batch->mu);
          if (!batch->done[i]) {
            batch->done[i] = true;
            ++batch->finished;
          }
        }),
        dht::Value::TypeFilter(kNodeRecordValueType));
  }

  AwaitWithWakeups(
      *runner_, batch->mu,
      [&batch, &started]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return batch->finished == started || batch->satisfied;
      },
      deadline);

  absl::MutexLock lock(&batch->mu);
  std::vector<std::string> pending;
  for (size_t i = 0; i < keys.size(); ++i) {
    keys[i].values = batch->values[i];
    if (!batch->done[i]) pending.push_back(keys[i].key);
  }
  if (batch->satisfied) return absl::OkStatus();
  if (!pending.empty()) {
    constexpr size_t kMaxNamed = 3;
    const size_t named = std::min(pending.size(), kMaxNamed);
    return absl::DeadlineExceededError(absl::StrCat(
        "DHT lookup of ", pending.size(), " of ", keys.size(),
        " keys did not finish within ", absl::FormatDuration(timeout), " (",
        absl::StrJoin(pending.begin(), pending.begin() + named, ", "),
        pending.size() > named ? ", ..." : "",
        "); connected peers: ", runner_->getNodesStats(AF_INET).good_nodes));
  }
  return absl::OkStatus();
}

std::vector<NodeRecord> DhtRegistry::ValidRecords(const KeyValues& key,
                                                  const std::string& model_id,
                                                  absl::Time now) {
  std::vector<NodeRecord> records;
  int rejected = 0;
  for (const std::shared_ptr<dht::Value>& value : key.values) {
    absl::StatusOr<NodeRecord> record = ParseRecordValue(*value, now);

    // A block key must contain records of its own model that cover the
    // block, because the signature does not cover the key and anyone could
    // copy a valid record under another key.
    if (record.ok() && key.block >= 0 &&
        !BelongsUnderBlock(*record, model_id, key.block)) {
      record = absl::InvalidArgumentError(
          absl::StrCat("record of node ", record->node_id(), " for model '",
                       record->model_id(), "' blocks ", SpanString(*record),
                       " does not belong under this key"));
    }

    if (record.ok()) {
      records.push_back(*std::move(record));
      continue;
    }
    ++rejected;
    if (rejected <= kMaxRejectLogsPerKey) {
      POLLEN_LOG_DEBUG("Rejected DHT value under {}: {}", key.key,
                       record.status().ToString());
    }
  }

  if (rejected > 0) {
    rejected_values_ += rejected;
    if (rejected > kMaxRejectLogsPerKey) {
      POLLEN_LOG_DEBUG("Rejected {} DHT values under {} in all", rejected,
                       key.key);
    }
  }
  return records;
}

absl::StatusOr<std::vector<NodeRecord>> DhtRegistry::FetchBlock(
    const std::string& model_id, int block, absl::Duration timeout) {
  if (block == INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("block ", block, " of model ", model_id,
                     " to fetch is past the largest block index"));
  }
  POLLEN_ASSIGN_OR_RETURN(std::vector<NodeRecord> records,
                          FetchSpan(model_id, block, block + 1, timeout));

  // A node announces one span per model, so two records of one node under
  // one block are an old and a new announcement. Only the newer is kept.
  std::map<std::string, NodeRecord> by_node;
  for (NodeRecord& record : records) {
    std::string node_id = record.node_id();
    KeepNewest(by_node, std::move(node_id), std::move(record));
  }
  return TakeRecords(by_node);
}

absl::Status DhtRegistry::FindBlockServer(const std::string& model_id,
                                          int block,
                                          const std::string& address,
                                          absl::Duration timeout) {
  if (model_id.empty() || block < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", block, " of model '", model_id,
        "' to look up needs a model id and a block of at least 0"));
  }

  auto serves_at_address = [address](const NodeRecord& record) {
    return record.address() == address &&
           record.state() != pollen::v1::NODE_STATE_OFFLINE;
  };
  // ValidRecords' checks, on the DHT thread, for one address.
  auto enough = [model_id, block, serves_at_address](const dht::Value& value) {
    const absl::StatusOr<NodeRecord> record =
        ParseRecordValue(value, absl::Now());
    return record.ok() && BelongsUnderBlock(*record, model_id, block) &&
           serves_at_address(*record);
  };
  std::vector<KeyValues> keys = {
      KeyValues{BlockKey(model_id, block), block, {}, enough}};
  const absl::Status lookup = GetValues(keys, timeout);

  // GetValues returns OK both when a value was enough and when the lookup
  // finished, so the values decide.
  const std::vector<NodeRecord> records =
      ValidRecords(keys[0], model_id, absl::Now());
  if (std::any_of(records.begin(), records.end(), serves_at_address)) {
    return absl::OkStatus();
  }
  if (!lookup.ok()) return lookup;
  return absl::NotFoundError(absl::StrCat(
      "no node at ", address, " announced block ", block, " of model ",
      model_id, " (", keys[0].values.size(), " values under that block)"));
}

absl::StatusOr<std::vector<NodeRecord>> DhtRegistry::FetchSpan(
    const std::string& model_id, int start, int end, absl::Duration timeout) {
  if (model_id.empty()) {
    return absl::InvalidArgumentError("model id to fetch is empty");
  }
  if (start < 0 || start >= end || end - start > kMaxBlocksPerRecord) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blocks [", start, ", ", end, ") of model ", model_id,
        " to fetch are empty, negative or more than ", kMaxBlocksPerRecord));
  }

  std::vector<KeyValues> keys;
  for (int block = start; block < end; ++block) {
    keys.push_back(KeyValues{BlockKey(model_id, block), block, {}});
  }
  const absl::Status lookup = GetValues(keys, timeout);

  const absl::Time now = absl::Now();
  std::map<std::tuple<uint32_t, uint32_t, std::string>, NodeRecord> by_span;
  for (const KeyValues& key : keys) {
    for (NodeRecord& record : ValidRecords(key, model_id, now)) {
      auto span = std::make_tuple(record.blocks().start(),
                                  record.blocks().end(), record.node_id());
      KeepNewest(by_span, std::move(span), std::move(record));
    }
  }

  if (!lookup.ok()) {
    if (by_span.empty()) return lookup;
    POLLEN_LOG_DEBUG("Using {} records of model {} found before: {}",
                     by_span.size(), model_id, lookup.ToString());
  }
  return TakeRecords(by_span);
}

absl::StatusOr<std::vector<NodeRecord>> DhtRegistry::FetchModelIndex(
    absl::Duration timeout) {
  std::vector<KeyValues> keys = {KeyValues{ModelIndexKey(), -1, {}}};
  const absl::Status lookup = GetValues(keys, timeout);

  std::map<std::pair<std::string, std::string>, NodeRecord> by_model;
  for (NodeRecord& record : ValidRecords(keys[0], "", absl::Now())) {
    auto model_and_node = std::make_pair(record.model_id(), record.node_id());
    KeepNewest(by_model, std::move(model_and_node), std::move(record));
  }

  if (!lookup.ok()) {
    if (by_model.empty()) return lookup;
    POLLEN_LOG_DEBUG("Using {} model index records found before: {}",
                     by_model.size(), lookup.ToString());
  }
  return TakeRecords(by_model);
}

}  // namespace pollen
