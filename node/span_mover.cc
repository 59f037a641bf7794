#include "node/span_mover.h"

#include "common/node_records.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/block_span.h"
#include "node/span_choice.h"
#include "scheduler/placement.h"

namespace pollen::node {
namespace {

constexpr absl::Duration kAnnounceTimeout = absl::Seconds(10);
constexpr absl::Duration kFetchTimeout = absl::Seconds(10);
// How often the mover's thread checks draining spans between other work.
constexpr absl::Duration kTick = absl::Seconds(1);

v1::BlockRange Range(int start, int end) {
  v1::BlockRange range;
  range.set_start(start);
  range.set_end(end);
  return range;
}

}  // namespace

SpanMover::SpanMover(MoverOptions options, MoverTargets targets)
    : options_(options), targets_(std::move(targets)), rng_(options.seed) {}

SpanMover::~SpanMover() { Stop(); }

void SpanMover::Start() {
  thread_ = std::thread([this] { Run(); });
}

void SpanMover::Stop() {
  std::deque<MoveRequest> abandoned;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  {
    absl::MutexLock lock(&mu_);
    abandoned.swap(requests_);
  }
  for (MoveRequest& request : abandoned) {
    request.done(absl::UnavailableError(
        "node is shutting down; the move did not start"));
  }
}

void SpanMover::RequestMove(int start, int end, MoveDone done) {
  {
    absl::MutexLock lock(&mu_);
    if (!stop_) {
      requests_.push_back(MoveRequest{start, end, std::move(done)});
      return;
    }
  }
  done(absl::UnavailableError("node is shutting down and does not move"));
}

void SpanMover::Run() {
  const bool rebalancing = options_.rebalance_period > absl::ZeroDuration();
  absl::Time next_rebalance = rebalancing
                                  ? absl::Now() + options_.rebalance_period
                                  : absl::InfiniteFuture();
  while (true) {
    // Wait for a request, the next rebalance or the next tick.
    std::optional<MoveRequest> request;
    {
      absl::MutexLock lock(&mu_);
      auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !requests_.empty();
      };
      mu_.AwaitWithTimeout(
          absl::Condition(&woken),
          std::min(kTick, std::max(absl::ZeroDuration(),
                                   next_rebalance - absl::Now())));
      if (stop_) return;
      if (!requests_.empty()) {
        request = std::move(requests_.front());
        requests_.pop_front();
      }
    }

    if (request.has_value()) {
      request->done(Move(request->start, request->end, "MoveBlocks request"));
    } else if (absl::Now() >= next_rebalance) {
      Rebalance();
      next_rebalance = absl::Now() + options_.rebalance_period;
    }
    ReleaseDrainedSpans(absl::Now());
  }
}

absl::StatusOr<v1::BlockRange> SpanMover::Move(int start, int end,
                                               const std::string& reason) {
  ServiceContext& service = *targets_.service;
  std::shared_ptr<const BlockSpan> old_span = service.spans.current();
  if (old_span->start() == start && old_span->end() == end) {
    return Range(start, end);
  }
  POLLEN_LOG_INFO("moving from blocks {}:{} to {}:{} ({})", old_span->start(),
                  old_span->end(), start, end, reason);

  // Load the new span while the old one serves.
  const absl::Time load_started = absl::Now();
  absl::StatusOr<std::unique_ptr<BlockSpan>> loaded =
      BlockSpan::Load(*targets_.checkpoint, start, end, targets_.dtype,
                      targets_.device, targets_.quantization);
  if (!loaded.ok()) {
    POLLEN_LOG_ERROR("move to blocks {}:{} failed, still serving {}:{}: {}",
                     start, end, old_span->start(), old_span->end(),
                     loaded.status().ToString());
    return loaded.status();
  }
  std::shared_ptr<const BlockSpan> new_span = std::move(*loaded);
  POLLEN_LOG_INFO("loaded blocks {}:{} in {}", start, end,
                  absl::FormatDuration(absl::Now() - load_started));

  // Accept sessions on both spans while the swarm learns of the new one.
  // The new record also replaces this node's record under the keys of the
  // blocks it leaves, where clients reject it, which withdraws them.
  service.spans.Set(new_span, old_span);
  const absl::Status announced =
      targets_.announcer->Announce(v1::NODE_STATE_ONLINE, kAnnounceTimeout);
  if (!announced.ok()) {
    POLLEN_LOG_WARN("announcing blocks {}:{} failed, the next periodic "
                    "announcement retries: {}",
                    start, end, announced.ToString());
  }

  // Stop opening sessions on the old span and ask its clients to move.
  service.spans.Set(new_span);
  const int draining = targets_.sessions->MarkDraining(old_span.get());
  POLLEN_LOG_INFO("now serving blocks {}:{}; {} sessions on {}:{} are "
                  "draining and closed after {} at the latest",
                  start, end, draining, old_span->start(), old_span->end(),
                  absl::FormatDuration(options_.drain_timeout));
  draining_.push_back(DrainingSpan{old_span, old_span.get(), old_span->start(),
                                   old_span->end(),
                                   absl::Now() + options_.drain_timeout});
  return Range(start, end);
}

void SpanMover::Rebalance() {
  const ServiceContext& service = *targets_.service;
  const std::shared_ptr<const BlockSpan> current = service.spans.current();
  const int num_blocks = static_cast<int>(service.config.num_hidden_layers);
  const int length = current->end() - current->start();

  absl::StatusOr<std::vector<v1::NodeRecord>> records =
      targets_.registry->FetchSpan(service.model_id, 0, num_blocks,
                                   kFetchTimeout);
  if (!records.ok()) {
    POLLEN_LOG_WARN("rebalance skipped: cannot read the records of {}: {}",
                    service.model_id, records.status().ToString());
    return;
  }

  // This node's span as it is now, even when its last record is out of
  // date.
  std::vector<scheduler::ServerSpan> spans =
      SpansFromRecords(*records, service.model_id);
  spans.erase(std::remove_if(spans.begin(), spans.end(),
                             [&service](const scheduler::ServerSpan& span) {
                               return span.node_id == service.node_id;
                             }),
              spans.end());
  scheduler::ServerSpan self;
  self.node_id = service.node_id;
  self.start = current->start();
  self.end = current->end();
  self.throughput = targets_.throughput;
  spans.insert(spans.begin(), self);

  const scheduler::MoveDecision decision = scheduler::DecideMove(
      spans, service.node_id, num_blocks, options_.min_balance_gain, rng_);
  if (!decision.move) {
    POLLEN_LOG_DEBUG("rebalance: staying on blocks {}:{} (weakest block {:.3g} "
                     "steps/s now, {:.3g} at the best other start)",
                     current->start(), current->end(), decision.current_min,
                     decision.new_min);
    return;
  }
  const absl::StatusOr<v1::BlockRange> moved =
      Move(decision.new_start, decision.new_start + length,
           absl::StrFormat("rebalance: the weakest block goes from %.3g to "
                           "%.3g steps/s",
                           decision.current_min, decision.new_min));
  if (!moved.ok()) {
    POLLEN_LOG_WARN("rebalance move failed: {}", moved.status().ToString());
  }
}

void SpanMover::ReleaseDrainedSpans(absl::Time now) {
  for (auto it = draining_.begin(); it != draining_.end();) {
    DrainingSpan& entry = *it;
    if (entry.span.expired()) {
      POLLEN_LOG_INFO("freed blocks {}:{}: their last session is gone",
                      entry.start, entry.end);
      it = draining_.erase(it);
      continue;
    }
    if (now >= entry.deadline && !entry.timed_out) {
      const int closed = targets_.sessions->CloseSessionsOn(
          entry.key,
          absl::StrCat("the node moved away from blocks ", entry.start, ":",
                       entry.end, " and the drain timeout of ",
                       absl::FormatDuration(options_.drain_timeout),
                       " passed"));
      POLLEN_LOG_INFO("drain timeout of blocks {}:{} passed; closed {} "
                      "sessions",
                      entry.start, entry.end, closed);
      entry.timed_out = true;
    } else if (!entry.timed_out) {
      // A session that opened while the move switched spans may not be
      // marked yet.
      targets_.sessions->MarkDraining(entry.key);
    }
    ++it;
  }
}

}  // namespace pollen::node
