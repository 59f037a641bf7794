#include "node/session_manager.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/block_span.h"

namespace pollen::node {

SessionManager::SessionManager(SessionLimits limits)
    : limits_(limits),
      batcher_(StepBatcherOptions{limits.prefill_chunk_tokens}) {}

absl::StatusOr<std::shared_ptr<Session>> SessionManager::Open(
    const SessionRequest& request, std::shared_ptr<const BlockSpan> span) {
  auto session = std::make_shared<Session>();
  session->request = request;
  session->reserved_tokens = request.batch_size * request.max_length;
  session->span_key = span.get();
  {
    absl::MutexLock lock(&session->mu);
    session->span = std::move(span);
  }

  // Reserve the budget first, so that two sessions racing for the last
  // tokens cannot both allocate.
  {
    absl::MutexLock lock(&mu_);
    if (sessions_.count(request.session_id) > 0) {
      return absl::AlreadyExistsError(absl::StrCat(
          "session '", request.session_id, "' is already open on this node"));
    }
    const int64_t left = limits_.cache_token_budget - reserved_tokens_;
    if (session->reserved_tokens > left) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "session '", request.session_id, "' needs ",
          session->reserved_tokens, " cache tokens (batch ",
          request.batch_size, " x max_length ", request.max_length,
          "), but only ", left, " of ", limits_.cache_token_budget,
          " are free; retry later or use another node"));
    }
    reserved_tokens_ += session->reserved_tokens;
    sessions_[request.session_id] = session;
  }

  absl::Status allocated = CatchTorchErrors(
      absl::StrCat("allocating KV cache for session '", request.session_id, "'"),
      [&]() {
        absl::MutexLock lock(&session->mu);
        session->cache = session->span->AllocateCache(
            request.from, request.to, request.batch_size, request.max_length);
        session->last_used = absl::Now();
        return absl::OkStatus();
      });
  if (!allocated.ok()) {
    Close(request.session_id, "cache allocation failed");
    return allocated;
  }

  POLLEN_LOG_INFO("session {} opened: blocks {}:{}, batch {}, max_length {}",
                  request.session_id, request.from, request.to,
                  request.batch_size, request.max_length);
  return session;
}

absl::StatusOr<std::shared_ptr<Session>> SessionManager::Find(
    const std::string& session_id) const {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session_id);
  if (it == sessions_.end()) {
    return absl::NotFoundError(
        absl::StrCat("session '", session_id, "' is not open on this node"));
  }
  return it->second;
}

void SessionManager::Close(const std::string& session_id,
                           const std::string& reason) {
  std::shared_ptr<Session> session;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end()) return;
    session = it->second;
    sessions_.erase(it);
    reserved_tokens_ -= session->reserved_tokens;
  }

  int64_t position = 0;
  {
    absl::MutexLock lock(&session->mu);
    session->closed = true;
    session->closed_reason = reason;
    session->cache.clear();
    session->span.reset();
    position = session->position;
  }
  batcher_.Forget(session.get());
  POLLEN_LOG_INFO("session {} closed ({}) after {} tokens", session_id,
                  reason, position);
}

int SessionManager::CloseIdle(absl::Time now) {
  std::vector<std::string> idle;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, session] : sessions_) {
      // A session inside a step holds its mutex and is not idle.
      if (!session->mu.TryLock()) continue;
      if (now - session->last_used > limits_.idle_timeout) idle.push_back(id);
      session->mu.Unlock();
    }
  }
  for (const std::string& id : idle) {
    Close(id, absl::StrCat("idle for more than ",
                           absl::FormatDuration(limits_.idle_timeout)));
  }
  return static_cast<int>(idle.size());
}

std::vector<std::string> SessionManager::SessionIdsOn(
    const BlockSpan* span) const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> ids;
  for (const auto& [id, session] : sessions_) {
    if (span == nullptr || session->span_key == span) ids.push_back(id);
  }
  return ids;
}

int SessionManager::MarkDraining(const BlockSpan* span) {
  absl::MutexLock lock(&mu_);
  int marked = 0;
  for (const auto& [id, session] : sessions_) {
    if (span != nullptr && session->span_key != span) continue;
    session->draining = true;
    ++marked;
  }
  return marked;
}

int SessionManager::CloseSessionsOn(const BlockSpan* span,
                                    const std::string& reason) {
  const std::vector<std::string> ids = SessionIdsOn(span);
  for (const std::string& id : ids) Close(id, reason);
  return static_cast<int>(ids.size());
}

int SessionManager::CountSessionsOn(const BlockSpan* span) const {
  return static_cast<int>(SessionIdsOn(span).size());
}

int64_t SessionManager::cache_tokens_left() const {
  absl::MutexLock lock(&mu_);
  return limits_.cache_token_budget - reserved_tokens_;
}

int SessionManager::open_sessions() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(sessions_.size());
}

}  // namespace pollen::node
