// Round-trip times from this node to the nodes that serve the block right
// after its span, announced as NodeRecord.next_rtt_ms so that clients can
// price routes through this node.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include <grpcpp/channel.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/dht_registry.h"
#include "node/block_service.h"

namespace pollen::node {

// Nodes pinged per probe, and how long one ping may take.
inline constexpr int kMaxProbedNodes = 3;
inline constexpr absl::Duration kPingDeadline = absl::Seconds(1);
// Weight of a new sample in the exponentially smoothed RTT.
inline constexpr double kRttSmoothing = 0.3;

// Fetches the records of block span.end() and times an Info RPC to up to
// kMaxProbedNodes of the ONLINE nodes there, preferring nodes it measured
// before. Nodes that no longer serve that block, or did not reply, leave
// the map.
//
// Thread-safe. Start runs ProbeOnce on a thread of its own every `period`
// until Stop or destruction.
class NextHopProber {
 public:
  // `registry` and `context` must outlive the prober.
  NextHopProber(DhtRegistry* registry, const ServiceContext* context,
                absl::Duration period);
  ~NextHopProber();

  NextHopProber(const NextHopProber&) = delete;
  NextHopProber& operator=(const NextHopProber&) = delete;

  void Start();
  void Stop();

  // Runs one probe now.
  void ProbeOnce();

  // Smoothed round-trip times in milliseconds, by node id.
  std::map<std::string, double> RoundTripTimesMs() const;

  // Returns whether the last probe's records show a node that is not
  // offline at `address` serving `block`, which must be the block after
  // this node's span. A cheap first check of push targets.
  bool Announced(const std::string& address, int block) const;

 private:
  void Run();

  // Times one Info RPC to `address`, after connecting, in milliseconds.
  absl::StatusOr<double> Ping(const std::string& address);

  DhtRegistry* const registry_;
  const ServiceContext* const context_;
  const absl::Duration period_;
  std::thread thread_;

  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, double> rtt_ms_ ABSL_GUARDED_BY(mu_);
  // From the last fetch: the block after the span, and the addresses of
  // the nodes there that are not offline.
  int fetched_block_ ABSL_GUARDED_BY(mu_) = -1;
  std::set<std::string> fetched_addresses_ ABSL_GUARDED_BY(mu_);

  // Used only by the probing thread (or the caller of ProbeOnce), by address.
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
};

}  // namespace pollen::node
