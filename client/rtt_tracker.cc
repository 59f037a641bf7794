#include "client/rtt_tracker.h"

#include <chrono>
#include <future>

#include "common/logging.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::client {
namespace {

constexpr double kSampleWeight = 0.3;
// Bounds the threads one refresh starts.
constexpr size_t kMaxParallelPings = 32;

}  // namespace

RttTracker::RttTracker(ChannelPool& channels, absl::Duration timeout)
    : channels_(channels), timeout_(timeout) {}

void RttTracker::AddSample(const std::string& node_id, double rtt_ms,
                           absl::Time now) {
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = estimates_.try_emplace(node_id);
  Estimate& estimate = it->second;
  estimate.rtt_ms = inserted ? rtt_ms
                             : (1 - kSampleWeight) * estimate.rtt_ms +
                                   kSampleWeight * rtt_ms;
  estimate.measured = now;
}

std::map<std::string, int64_t> RttTracker::CacheTokensLeft(
    absl::Time since) const {
  absl::MutexLock lock(&mu_);
  std::map<std::string, int64_t> cache;
  for (const auto& [node_id, estimate] : estimates_) {
    if (estimate.measured >= since) {
      cache[node_id] = estimate.cache_tokens_left;
    }
  }
  return cache;
}

std::map<std::string, double> RttTracker::RttsMs() const {
  absl::MutexLock lock(&mu_);
  std::map<std::string, double> rtts;
  for (const auto& [node_id, estimate] : estimates_) {
    rtts[node_id] = estimate.rtt_ms;
  }
  return rtts;
}

void RttTracker::Refresh(const std::vector<scheduler::ServerSpan>& spans,
                         absl::Duration max_age) {
  const absl::Time now = absl::Now();
  std::vector<const scheduler::ServerSpan*> stale;
  {
    absl::MutexLock lock(&mu_);
    for (const scheduler::ServerSpan& span : spans) {
      auto it = estimates_.find(span.node_id);
      if (it == estimates_.end() || now - it->second.measured > max_age) {
        stale.push_back(&span);
      }
    }
  }

  for (size_t first = 0; first < stale.size(); first += kMaxParallelPings) {
    const size_t last = std::min(stale.size(), first + kMaxParallelPings);
    std::vector<std::future<void>> pings;
    for (size_t i = first; i < last; ++i) {
      const scheduler::ServerSpan& span = *stale[i];
      pings.push_back(std::async(std::launch::async, [this, &span]() {
        auto stub = v1::BlockService::NewStub(channels_.Get(span.address));
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() +
                             absl::ToChronoMilliseconds(timeout_));
        v1::InfoResponse info;
        const auto started = std::chrono::steady_clock::now();
        const grpc::Status status =
            stub->Info(&context, v1::InfoRequest(), &info);
        const double rtt_ms = std::chrono::duration<double, std::milli>(
                                  std::chrono::steady_clock::now() - started)
                                  .count();
        if (status.ok()) {
          AddSample(span.node_id, rtt_ms, absl::Now());
          absl::MutexLock lock(&mu_);
          estimates_[span.node_id].cache_tokens_left =
              static_cast<int64_t>(info.cache_tokens_left());
        } else {
          POLLEN_LOG_DEBUG("ping of node {} at {} failed: {}", span.node_id,
                           span.address, status.error_message());
        }
      }));
    }
    for (auto& ping : pings) ping.wait();
  }
}

}  // namespace pollen::client
