#include "node/step_batcher.h"

#include <algorithm>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/block_span.h"
#include "node/session_manager.h"
#include "node/step_pusher.h"

namespace pollen::node {

// A queued step and its progress.
struct StepBatcher::Pending {
  StepTask task;
  int64_t batch = 0;
  int64_t new_tokens = 0;
  // New tokens already run by earlier passes.
  int64_t tokens_done = 0;
  // [batch, new_tokens, hidden_size] in the input's dtype, filled chunk by
  // chunk; undefined until the first chunk of a step that takes several.
  at::Tensor output;
  // The step's error: OK while it runs and when it succeeded.
  absl::Status error;
};

namespace {

// Steps with equal keys may share a pass.
struct PassKey {
  const BlockSpan* span = nullptr;
  int from = 0;
  int to = 0;
  // The session itself when it has adapters, so that it runs alone.
  const Session* alone = nullptr;

  bool operator==(const PassKey& other) const {
    return span == other.span && from == other.from && to == other.to &&
           alone == other.alone;
  }
};

PassKey KeyOf(const Session& session) {
  PassKey key;
  key.span = session.span_key;
  key.from = session.request.from;
  key.to = session.request.to;
  key.alone = session.request.adapters.empty() ? nullptr : &session;
  return key;
}

// NOT_FOUND when the session was closed while its step waited.
absl::Status CheckOpen(const Session& session)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(session.mu) {
  if (!session.closed) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("session '",
                                          session.request.session_id,
                                          "' not found: it was closed (",
                                          session.closed_reason, ")"));
}

// Checks a step against its session before its first chunk runs.
absl::Status CheckStep(const Session& session, int64_t position,
                       int64_t new_tokens)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(session.mu) {
  const SessionRequest& request = session.request;
  POLLEN_RETURN_IF_ERROR(CheckOpen(session));
  if (position != session.position) {
    return absl::AbortedError(absl::StrCat(
        "step position ", position, " does not match the ", session.position,
        " tokens session '", request.session_id,
        "' holds; replay from position 0"));
  }
  if (session.position + new_tokens > request.max_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step of ", new_tokens, " tokens at position ", session.position,
        " exceeds max_length ", request.max_length, " of session '",
        request.session_id, "'"));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

StepBatcherOptions Sanitize(StepBatcherOptions options) {
  options.max_pass_tokens = std::max<int64_t>(options.max_pass_tokens, 1);
  return options;
}

}  // namespace

StepBatcher::StepBatcher(StepBatcherOptions options)
    : options_(Sanitize(std::move(options))),
      worker_([this] { WorkerLoop(); }) {}

StepBatcher::~StepBatcher() {
  WaitIdle();
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  worker_.join();
}

void StepBatcher::WaitIdle() const {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](const bool* running) { return !*running; }, &running_));
}

void StepBatcher::WorkerLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return worker_turn_ || stopping_;
      };
      mu_.Await(absl::Condition(&woken));
      if (!worker_turn_) return;
      worker_turn_ = false;
    }
    RunUntilIdle(/*may_wait=*/true);
  }
}

void StepBatcher::Submit(StepTask task) {
  std::vector<StepTask> tasks;
  tasks.push_back(std::move(task));
  Submit(std::move(tasks));
}

void StepBatcher::Submit(std::vector<StepTask> tasks) {
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (StepTask& task : tasks) {
      auto pending = std::make_unique<Pending>();
      pending->batch = task.hidden.size(0);
      pending->new_tokens = task.hidden.size(1);
      pending->task = std::move(task);
      NoteArrival(pending->task.session, now);
      queued_.push_back(std::move(pending));
    }
    if (running_ || queued_.empty()) return;
    running_ = true;
  }
  RunUntilIdle(/*may_wait=*/false);
}

void StepBatcher::RunUntilIdle(bool may_wait) {
  // Steps this thread has taken from the queue, oldest first. Only this
  // thread touches them until they are done.
  std::vector<std::unique_ptr<Pending>> active;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      for (auto& pending : queued_) active.push_back(std::move(pending));
      queued_.clear();
      if (active.empty()) {
        running_ = false;
        return;
      }

      // Wait for the steps of active sessions that have not arrived, so
      // that they share this pass (see the class comment).
      const PassKey key = KeyOf(*active.front()->task.session);
      const absl::Duration round = RoundTime();
      const size_t expected =
          ActiveSessions(absl::Now(), key.from, key.to, round);
      const absl::Duration gather_wait = GatherWait(key.from, round);
      const bool waits =
          active.size() < expected && gather_wait > absl::ZeroDuration();
      if (waits && !may_wait) {
        // The batcher's thread waits instead, while this one goes on
        // receiving steps.
        for (auto it = active.rbegin(); it != active.rend(); ++it) {
          queued_.push_front(std::move(*it));
        }
        worker_turn_ = true;
        return;
      }
      if (waits) {
        const size_t steps_taken = active.size();
        auto arrived = [this, steps_taken, expected]()
                           ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
                             return steps_taken + queued_.size() >= expected;
                           };
        const absl::Time wait_start = absl::Now();
        mu_.AwaitWithTimeout(absl::Condition(&arrived), gather_wait);
        for (auto& pending : queued_) active.push_back(std::move(pending));
        queued_.clear();
        POLLEN_LOG_DEBUG(
            "pass on blocks {}:{} waited {:.3f} ms and has {} of {} active "
            "sessions' steps",
            key.from, key.to,
            absl::ToDoubleMilliseconds(absl::Now() - wait_start),
            active.size(), expected);
      }
    }
    RunPass(active);
  }
}

void StepBatcher::NoteArrival(const std::shared_ptr<Session>& session,
                              absl::Time now) {
  Activity& activity = activity_[session.get()];
  if (activity.session.lock() == session) {
    rounds_.push_back(now - activity.last_arrival);
    if (rounds_.size() > kRoundsKept) rounds_.pop_front();
  } else {
    activity.session = session;
    activity.from = session->request.from;
    activity.to = session->request.to;
  }
  activity.last_arrival = now;
}

void StepBatcher::Forget(const Session* session) {
  absl::MutexLock lock(&mu_);
  activity_.erase(session);
}

absl::Duration StepBatcher::RoundTime() const {
  if (rounds_.empty()) return absl::ZeroDuration();
  std::vector<absl::Duration> sorted(rounds_.begin(), rounds_.end());
  std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2,
                   sorted.end());
  return sorted[sorted.size() / 2];
}

size_t StepBatcher::ActiveSessions(absl::Time now, int from, int to,
                                   absl::Duration round) {
  const absl::Time since = now - (kActiveRounds * round + kRoundTripAllowance);
  size_t count = 0;
  for (auto it = activity_.begin(); it != activity_.end();) {
    const Activity& activity = it->second;
    if (activity.session.expired()) {
      it = activity_.erase(it);
      continue;
    }
    // A quiet session keeps its record, so that its next step still
    // measures a round. Dropping it would let one short first round
    // stop every later measurement, and with them every regrouping.
    if (activity.last_arrival >= since && activity.from == from &&
        activity.to == to) {
      ++count;
    }
    ++it;
  }
  return count;
}

absl::Duration StepBatcher::GatherWait(int from, absl::Duration round) const {
  if (from == 0) return std::min(round, kMaxRoundWait);
  return std::min(last_pass_time_ * kGatherFraction, kMaxGatherWait);
}

std::vector<StepBatcher::Member> StepBatcher::ChooseMembers(
    const std::vector<std::unique_ptr<Pending>>& active) const {
  const Pending* oldest = active.front().get();
  const PassKey key = KeyOf(*oldest->task.session);
  std::vector<Member> members;
  auto is_member = [&members](const Pending* pending) {
    return std::any_of(members.begin(), members.end(),
                       [pending](const Member& member) {
                         return member.pending == pending;
                       });
  };

  // Whole steps that fit, in arrival order: decode steps, short prompts.
  int64_t budget = options_.max_pass_tokens;
  for (const auto& pending : active) {
    if (!(KeyOf(*pending->task.session) == key)) continue;
    const int64_t left = pending->new_tokens - pending->tokens_done;
    if (pending->batch * left > budget) continue;
    members.push_back(Member{pending.get(), left});
    budget -= pending->batch * left;
  }

  // Chunks of the longer steps from the tokens left; the oldest step gets
  // at least one token whatever the budget, so it cannot starve.
  for (const auto& pending : active) {
    const bool is_oldest = pending.get() == oldest;
    if ((budget <= 0 && !is_oldest) || is_member(pending.get()) ||
        !(KeyOf(*pending->task.session) == key)) {
      continue;
    }
    int64_t chunk = std::min(pending->new_tokens - pending->tokens_done,
                             std::max<int64_t>(budget, 0) / pending->batch);
    if (chunk < 1 && is_oldest) chunk = 1;
    if (chunk < 1) continue;
    members.push_back(Member{pending.get(), chunk});
    budget -= pending->batch * chunk;
  }
  return members;
}

void StepBatcher::RunPass(std::vector<std::unique_ptr<Pending>>& active) {
  const PassKey key = KeyOf(*active.front()->task.session);
  const std::vector<Member> members = ChooseMembers(active);

  // Lock the sessions for the pass, in address order: only this thread
  // holds several at once, but absl's deadlock detector aborts the process
  // when two passes take them in opposite orders.
  std::vector<Session*> sessions;
  for (const Member& member : members) {
    sessions.push_back(member.pending->task.session.get());
  }
  std::sort(sessions.begin(), sessions.end());
  std::vector<std::unique_ptr<absl::MutexLock>> locks;
  for (Session* session : sessions) {
    locks.push_back(std::make_unique<absl::MutexLock>(&session->mu));
  }

  // Check each step and gather the pass's entries.
  std::vector<SpanBatchEntry> entries;
  std::vector<Pending*> running;  // the members behind `entries`
  std::shared_ptr<const BlockSpan> span;
  for (const Member& member : members) {
    Pending& pending = *member.pending;
    Session& session = *pending.task.session;
    pending.error = pending.tokens_done == 0
                        ? CheckStep(session, pending.task.position,
                                    pending.new_tokens)
                        : CheckOpen(session);
    if (!pending.error.ok()) continue;
    span = session.span;
    SpanBatchEntry entry;
    // A whole step needs no narrowing view (a libtorch operator).
    entry.hidden = pending.tokens_done == 0 && member.chunk == pending.new_tokens
                       ? pending.task.hidden
                       : pending.task.hidden.narrow(1, pending.tokens_done,
                                                    member.chunk);
    entry.cache = &session.cache;
    entry.position = session.position + pending.tokens_done;
    entries.push_back(std::move(entry));
    running.push_back(&pending);
  }

  // Run the pass. A session with adapters runs alone, through Forward.
  absl::StatusOr<std::vector<at::Tensor>> outputs;
  const absl::Time pass_start = absl::Now();
  if (!entries.empty()) {
    ++passes_run_;
    if (key.alone != nullptr) {
      absl::StatusOr<at::Tensor> output = span->Forward(
          entries[0].hidden, *entries[0].cache, entries[0].position, key.from,
          key.to, &running[0]->task.session->request.adapters);
      if (output.ok()) {
        outputs = std::vector<at::Tensor>{std::move(*output)};
      } else {
        outputs = output.status();
      }
    } else {
      outputs = span->ForwardBatch(entries, key.from, key.to);
    }
  }

  const absl::Time pass_end = absl::Now();
  if (!entries.empty()) {
    const absl::Duration pass_time = pass_end - pass_start;
    {
      absl::MutexLock lock(&mu_);
      last_pass_time_ = pass_time;
    }
    POLLEN_LOG_DEBUG("pass of {} step(s) on blocks {}:{} took {:.3f} ms",
                     entries.size(), key.from, key.to,
                     absl::ToDoubleMilliseconds(pass_time));
  }

  // Collect each step's chunk; a step is done when its last chunk ran, and
  // only then does its session hold the new tokens.
  for (size_t i = 0; i < running.size(); ++i) {
    Pending& pending = *running[i];
    if (!outputs.ok()) {
      pending.error = outputs.status();
      continue;
    }
    const int64_t chunk = entries[i].hidden.size(1);
    pending.error = CatchTorchErrors("collecting a step's output", [&] {
      at::Tensor& chunk_output = (*outputs)[i];
      if (pending.tokens_done == 0 && chunk == pending.new_tokens) {
        pending.output = std::move(chunk_output);
      } else {
        if (!pending.output.defined()) {
          pending.output =
              at::empty(pending.task.hidden.sizes(), chunk_output.options());
        }
        pending.output.narrow(1, pending.tokens_done, chunk).copy_(chunk_output);
      }
      return absl::OkStatus();
    });
    if (!pending.error.ok()) continue;
    pending.tokens_done += chunk;
    if (pending.tokens_done == pending.new_tokens) {
      Session& session = *pending.task.session;
      session.position += pending.new_tokens;
      session.last_used = absl::Now();
    }
  }
  entries.clear();
  locks.clear();
  span.reset();

  // Report finished and failed steps, without locks, and drop them.
  std::vector<std::unique_ptr<Pending>> finished;
  for (auto it = active.begin(); it != active.end();) {
    Pending& pending = **it;
    if (pending.error.ok() && pending.tokens_done < pending.new_tokens) {
      ++it;
      continue;
    }
    finished.push_back(std::move(*it));
    it = active.erase(it);
  }
  // Outputs that go on to the next node leave together, after the loop.
  StepPusher::Batch push_batch;
  for (const auto& pending : finished) {
    StepTask& task = pending->task;
    if (pending->error.ok()) {
      task.done(std::move(pending->output));
    } else {
      task.done(pending->error);
    }
    task.inference_scope.reset();
  }
}

}  // namespace pollen::node
