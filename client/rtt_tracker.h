// Round-trip times from this client to nodes, measured with the Info RPC,
// and the free cache those replies report.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/remote_chain.h"
#include "scheduler/route.h"

namespace pollen::client {

// Keeps an exponentially smoothed RTT per node. Thread-safe.
class RttTracker {
 public:
  // `channels` must outlive the tracker. A ping that takes longer than
  // `timeout` counts as a failure and leaves the node unmeasured.
  explicit RttTracker(ChannelPool& channels,
                      absl::Duration timeout = absl::Milliseconds(500));

  // Pings, in parallel, the nodes of `spans` not measured within `max_age`.
  void Refresh(const std::vector<scheduler::ServerSpan>& spans,
               absl::Duration max_age = absl::Seconds(30));

  // Smoothed RTTs in milliseconds by node id.
  std::map<std::string, double> RttsMs() const;

  // Free cache tokens by node id, from the replies measured at or after
  // `since`.
  std::map<std::string, int64_t> CacheTokensLeft(absl::Time since) const;

  // Folds one sample into the node's average (weight 0.3 for the sample;
  // the first sample is taken as it is).
  void AddSample(const std::string& node_id, double rtt_ms, absl::Time now);

 private:
  struct Estimate {
    double rtt_ms = 0;
    absl::Time measured;
    // From the last reply.
    int64_t cache_tokens_left = 0;
  };

  ChannelPool& channels_;
  const absl::Duration timeout_;
  mutable absl::Mutex mu_;
  std::map<std::string, Estimate> estimates_ ABSL_GUARDED_BY(mu_);
};

}  // namespace pollen::client
