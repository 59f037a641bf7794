#include "client/swarm_client.h"

#include "common/node_records.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "scheduler/latency_route.h"

namespace pollen::client {
namespace {

constexpr absl::Duration kFetchTimeout = absl::Seconds(5);
constexpr absl::Duration kPollInterval = absl::Milliseconds(500);
constexpr absl::Duration kFirstBan = absl::Seconds(1);
constexpr absl::Duration kMaxBan = absl::Minutes(5);

}  // namespace

absl::StatusOr<std::unique_ptr<SwarmClient>> SwarmClient::Connect(
    const std::vector<std::string>& initial_peers) {
  if (initial_peers.empty()) {
    return absl::InvalidArgumentError(
        "no initial peers given; pass --initial-peers HOST:PORT of a node "
        "in the swarm");
  }
  DhtOptions options;
  options.bootstrap = initial_peers;
  POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<DhtRegistry> registry,
                          DhtRegistry::Start(options));
  POLLEN_RETURN_IF_ERROR(registry->WaitConnected(absl::Seconds(10)));
  return std::unique_ptr<SwarmClient>(new SwarmClient(std::move(registry)));
}

void SwarmClient::ReportFailure(const std::string& node_id) {
  absl::MutexLock lock(&mu_);
  Ban& ban = bans_[node_id];
  // The sessions that were on the node when it failed report it one after
  // another. No new session uses a banned node, so their reports are one
  // failure.
  if (ban.until > absl::Now()) {
    POLLEN_LOG_DEBUG("node {} failed again while banned; the ban stays",
                     node_id);
    return;
  }
  ban.failures = std::min(ban.failures + 1, 20);
  const absl::Duration duration =
      std::min(kMaxBan, kFirstBan * (int64_t{1} << (ban.failures - 1)));
  ban.until = absl::Now() + duration;
  POLLEN_LOG_WARN("banned node {} for {} after {} failure(s) in a row",
                  node_id, absl::FormatDuration(duration), ban.failures);
}

std::set<std::string> SwarmClient::BannedNodes(absl::Time now) const {
  absl::MutexLock lock(&mu_);
  std::set<std::string> banned;
  for (const auto& [node_id, ban] : bans_) {
    if (ban.until > now) banned.insert(node_id);
  }
  return banned;
}

absl::StatusOr<std::vector<scheduler::RouteHop>> SwarmClient::FindRoute(
    const std::string& model_id, int start, int end, absl::Duration wait,
    const scheduler::RouteOptions& route_options, int64_t tokens_needed) {
  const absl::Time deadline = absl::Now() + wait;
  absl::Status last_error;
  for (int attempt = 1;; ++attempt) {
    auto records = registry_->FetchSpan(model_id, start, end, kFetchTimeout);
    if (records.ok()) {
      scheduler::RouteOptions options = route_options;
      const std::set<std::string> banned = BannedNodes(absl::Now());
      options.excluded_nodes.insert(banned.begin(), banned.end());
      std::vector<scheduler::ServerSpan> spans =
          SpansFromRecords(*records, model_id);
      std::vector<scheduler::ServerSpan> candidates;
      for (const scheduler::ServerSpan& span : spans) {
        if (options.excluded_nodes.count(span.node_id) == 0) {
          candidates.push_back(span);
        }
      }
      rtts_.Refresh(candidates);
      scheduler::LatencyModel latency;
      latency.client_rtt_ms = rtts_.RttsMs();
      latency.tokens_needed = tokens_needed;
      auto route =
          scheduler::FindFastestRoute(spans, start, end, latency, options);
      if (absl::IsResourceExhausted(route.status())) {
        // An announcement may be an announce period old, so the nodes' own
        // counts of free cache decide.
        const absl::Time pinged = absl::Now();
        rtts_.Refresh(candidates, absl::ZeroDuration());
        const std::map<std::string, int64_t> live = rtts_.CacheTokensLeft(pinged);
        for (scheduler::ServerSpan& span : spans) {
          const auto it = live.find(span.node_id);
          if (it != live.end()) span.cache_tokens_left = it->second;
        }
        route = scheduler::FindFastestRoute(spans, start, end, latency, options);
      }
      if (route.ok()) return route;
      // Full nodes free cache only as their sessions end; waiting for more
      // announcements would not help.
      if (absl::IsResourceExhausted(route.status())) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "model '", model_id, "': ", route.status().message()));
      }
      last_error = route.status();
    } else {
      last_error = records.status();
    }

    if (absl::Now() + kPollInterval > deadline) break;
    POLLEN_LOG_DEBUG("no complete route for {} yet (attempt {}): {}", model_id,
                     attempt, last_error.ToString());
    absl::SleepFor(kPollInterval);
  }
  return absl::Status(
      last_error.code(),
      absl::StrCat("model '", model_id, "': ", last_error.message(),
                   wait > absl::ZeroDuration()
                       ? absl::StrCat(" after waiting ", absl::FormatDuration(wait))
                       : ""));
}

}  // namespace pollen::client
