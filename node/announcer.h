// Building and announcing this node's NodeRecord.
#pragma once

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/dht_registry.h"
#include "node/block_service.h"
#include "node/throughput.h"
#include "pollen/v1/pollen.pb.h"

namespace pollen::node {

class NextHopProber;

// Record fields that stay fixed while the node runs.
struct RecordInfo {
  // host:port of the BlockService.
  std::string address;
  // Name shown by `pollen status`.
  std::string public_name;
  Throughput throughput;
  // Device of the blocks ("cpu", "cuda:0") and their dtype ("float32").
  std::string device;
  std::string dtype;
  // "int8" for int8 weight-only quantisation; empty for none.
  std::string quantization;
  // How long each announcement stays valid.
  absl::Duration record_ttl = absl::Seconds(90);
};

// Announces the node's record for the span the service currently serves.
//
// Thread-safe. Announce reads the current span and announces it under one
// mutex, held while the DHT stores the values, so that a record of an older
// span never replaces the record of a newer one.
class Announcer {
 public:
  // `registry`, `context` and `prober` (which may be null) must outlive the
  // announcer.
  Announcer(DhtRegistry* registry, const ServiceContext* context,
            const NextHopProber* prober, RecordInfo info);

  // Returns the record for the current span in `state`, announced now.
  v1::NodeRecord MakeRecord(v1::NodeState state) const;

  // Announces MakeRecord(state), waiting up to `timeout` for the DHT. An
  // OFFLINE record announces no free cache. Returns the registry's error.
  absl::Status Announce(v1::NodeState state, absl::Duration timeout);

 private:
  DhtRegistry* const registry_;
  const ServiceContext* const context_;
  const NextHopProber* const prober_;
  const RecordInfo info_;

  absl::Mutex announce_mu_;
};

}  // namespace pollen::node
