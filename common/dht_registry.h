// The swarm's registry of nodes, kept in an OpenDHT distributed hash table.
//
// Each node stores its NodeRecord (serialized protobuf, in a value signed by
// the node's identity) under one key per (model, block) and under one key
// that lists every model in the swarm. Clients read the records back and
// keep only those that are signed by the node they name, unexpired, and
// stored under a key that matches their model and blocks.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <opendht/crypto.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "pollen/v1/pollen.pb.h"

namespace dht {
class DhtRunner;
struct Value;
}  // namespace dht

namespace pollen {

struct DhtOptions {
  // UDP port to bind on all IPv4 interfaces; 0 picks a free one.
  int port = 0;

  // "host:port" of peers to join over IPv4, e.g. "127.0.0.1:4222" or
  // "node1.lan:4222". Empty starts a new swarm.
  std::vector<std::string> bootstrap;

  // Signs announced records. Empty for read-only clients, which can fetch
  // but not announce.
  dht::crypto::Identity identity;
};

// OpenDHT value type of signed NodeRecords. Peers store values of this type
// only when they are signed and at most kMaxRecordBytes long.
inline constexpr uint16_t kNodeRecordValueType = 0x7050;

// Largest serialized NodeRecord accepted, in bytes. A record takes a few
// hundred bytes plus about 55 per next_rtt_ms entry, so this leaves room for
// some 250 entries. OpenDHT itself accepts values of up to 64 KiB.
inline constexpr size_t kMaxRecordBytes = 16 * 1024;

// Returns the DHT key of block `block` of `model_id`:
// "pollen/v1/<model>/block/<block>".
std::string BlockKey(const std::string& model_id, int block);

// Returns the DHT key under which every node stores its record once per
// model, so that `pollen status` can list the models: "pollen/v1/models".
std::string ModelIndexKey();

// Returns the NodeRecord carried by `value`, or why it cannot be trusted.
// UNAUTHENTICATED: the value is unsigned, its signature does not verify, or
// record.node_id is not the id of the key that signed it.
// INVALID_ARGUMENT: the value type or payload is not a NodeRecord with a
// model id and a non-empty block range.
// FAILED_PRECONDITION: expires_ms is not after `now`.
// The key the value was stored under is not checked here.
absl::StatusOr<pollen::v1::NodeRecord> ParseRecordValue(const dht::Value& value,
                                                        absl::Time now);

// A participant in the swarm's DHT (a threaded dht::DhtRunner) that announces
// and fetches NodeRecords.
//
// Thread-safe: every method may be called from any thread. The destructor
// must not run concurrently with other calls.
class DhtRegistry {
 public:
  // Binds the UDP port, starts the DHT threads and contacts the bootstrap
  // peers without waiting for them (see WaitConnected).
  // INVALID_ARGUMENT: a bootstrap address is malformed, or the identity has
  // only one of its key and certificate, or they do not match.
  // UNAVAILABLE: the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<DhtRegistry>> Start(
      const DhtOptions& options);

  // Leaves the DHT and joins the DHT threads. Values this node stored stay on
  // its peers until their DHT expiration (two minutes).
  ~DhtRegistry();

  DhtRegistry(const DhtRegistry&) = delete;
  DhtRegistry& operator=(const DhtRegistry&) = delete;

  // Bound UDP port.
  int port() const;

  // NodeIdOf(identity), empty without an identity.
  std::string node_id() const { return node_id_; }

  // Waits until at least one peer has replied. Returns OK at once for a new
  // swarm (no bootstrap peers), and DEADLINE_EXCEEDED naming the bootstrap
  // peers when none replied within `timeout`.
  absl::Status WaitConnected(absl::Duration timeout);

  // Signs `record` and stores it under BlockKey(model, b) for every b in
  // record.blocks, and under ModelIndexKey(). record.node_id must equal
  // node_id(). Re-announcing replaces this node's previous values for the
  // model (same value id, increasing sequence number), so clients see one
  // record per node per block. A node announces one span per model, and a
  // new span of the same model replaces the old one. When the span shrinks,
  // the new record also replaces the old one under the blocks that left it,
  // where clients then reject it. OpenDHT keeps refreshing the values on
  // their storing peers until they are replaced or the registry stops.
  //
  // Waits up to `timeout`, first for a peer as WaitConnected does, then
  // until a peer has stored each value. In a new swarm that no peer has
  // joined yet, the values stay in this node's storage and Announce returns
  // OK.
  // FAILED_PRECONDITION: the registry has no identity.
  // INVALID_ARGUMENT: the record has another node id, no model id, an empty
  // block range, more than 1024 blocks, or more than kMaxRecordBytes
  // serialized.
  // UNAVAILABLE: no peer stored some value.
  // DEADLINE_EXCEEDED: no peer replied, or the puts did not finish in time.
  absl::Status Announce(const pollen::v1::NodeRecord& record,
                        absl::Duration timeout);

  // Returns the valid records of nodes serving `block` of `model_id`, newest
  // (by announced_ms) per node, in any state (callers skip OFFLINE ones).
  // Waits for a peer first, as WaitConnected does, within `timeout`. When
  // the lookup does not finish within `timeout`, returns the records
  // received so far, or DEADLINE_EXCEEDED when there are none.
  absl::StatusOr<std::vector<pollen::v1::NodeRecord>> FetchBlock(
      const std::string& model_id, int block, absl::Duration timeout);

  // Returns OK as soon as a valid record arrives in which a node at
  // `address` that is not OFFLINE serves `block` of `model_id`, without
  // waiting for the rest of the lookup. NOT_FOUND when the lookup ended
  // without one, and DEADLINE_EXCEEDED when it did not end within `timeout`.
  // NOTE: a newer OFFLINE record of the same node may still be on its way,
  // which FetchBlock would have preferred.
  absl::Status FindBlockServer(const std::string& model_id, int block,
                               const std::string& address,
                               absl::Duration timeout);

  // Returns the valid records for blocks [start, end), looked up in parallel,
  // one per (node, block range) with the newest announced_ms, ordered by
  // block range then node id. Timeouts behave as in FetchBlock.
  absl::StatusOr<std::vector<pollen::v1::NodeRecord>> FetchSpan(
      const std::string& model_id, int start, int end, absl::Duration timeout);

  // Returns the valid records under ModelIndexKey(), newest per node and
  // model, ordered by model id then node id. Timeouts behave as in
  // FetchBlock.
  absl::StatusOr<std::vector<pollen::v1::NodeRecord>> FetchModelIndex(
      absl::Duration timeout);

  // Number of fetched values dropped as untrustworthy since Start.
  uint64_t rejected_value_count() const { return rejected_values_.load(); }

  // Stores `value` under `key` exactly as given (no signing, no checks), so
  // that tests can plant unsigned, forged or misplaced values. Waits up to
  // `timeout` for the put to finish and returns OK even when no peer stored
  // it, because the value stays in this node's storage either way.
  absl::Status PutValueForTesting(const std::string& key,
                                  std::shared_ptr<dht::Value> value,
                                  absl::Duration timeout);

 private:
  // OpenDHT's NodeStatus, kept here so that this header does not pull in
  // the OpenDHT value and callback headers.
  enum class PeerStatus { kDisconnected, kConnecting, kConnected };

  // The last announcement of this node for one model.
  struct ModelAnnouncement {
    uint64_t value_id = 0;  // shared by all of the model's keys
    uint16_t seq = 0;       // of the last announced value
    int start = 0;          // announced blocks [start, end)
    int end = 0;
  };

  // Values received for one key.
  struct KeyValues {
    std::string key;
    int block = -1;  // -1 for ModelIndexKey()
    std::vector<std::shared_ptr<dht::Value>> values;
    // When set, the lookup of this key ends as soon as a value satisfies
    // it. It runs on the DHT thread.
    std::function<bool(const dht::Value&)> enough;
  };

  DhtRegistry(std::vector<std::string> bootstrap,
              dht::crypto::Identity identity);

  void OnStatusChanged(PeerStatus status);

  // Asks OpenDHT to ping its peers again, at most once a second, while it
  // has peers in its routing table but none has replied yet. In that state
  // OpenDHT 2.4 queues this node's gets and puts until its next node
  // confirmation, which can be seconds away.
  void NudgeIfConnecting();

  // Waits for a peer, then looks up `keys` in parallel and fills in the
  // values of each. Returns DEADLINE_EXCEEDED when no peer replied or some
  // lookup did not finish within `timeout`, and fills in the values
  // received so far either way.
  absl::Status GetValues(std::vector<KeyValues>& keys, absl::Duration timeout);

  // Parses and checks the values of `key`, and counts and logs the rejected
  // ones.
  std::vector<pollen::v1::NodeRecord> ValidRecords(const KeyValues& key,
                                                   const std::string& model_id,
                                                   absl::Time now);

  // Whether this node started a new swarm (it has no bootstrap peers) and
  // no peer is in it now: none has joined yet, or every peer has left or
  // stopped responding. Its own storage is then the only place values can
  // go, and peers that join later find them there.
  bool IsAloneInNewSwarm() const;

  std::string BootstrapList() const;

  // Set once in Start.
  const std::vector<std::string> bootstrap_;
  const dht::crypto::Identity identity_;
  const std::string node_id_;
  std::unique_ptr<dht::DhtRunner> runner_;

  std::atomic<uint64_t> rejected_values_{0};

  mutable absl::Mutex status_mu_;
  PeerStatus status_ ABSL_GUARDED_BY(status_mu_) = PeerStatus::kDisconnected;
  absl::Time last_nudge_ ABSL_GUARDED_BY(status_mu_) = absl::InfinitePast();

  // Held while values are signed and handed to the runner, so that puts of
  // one model reach OpenDHT in sequence-number order. Never held while
  // waiting for the DHT.
  absl::Mutex announce_mu_;
  std::map<std::string, ModelAnnouncement> announcements_
      ABSL_GUARDED_BY(announce_mu_);
};

}  // namespace pollen
