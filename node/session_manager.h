// Inference sessions open on a node and the KV cache budget they share.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "node/adapters.h"
#include "node/llama_block.h"
#include "node/step_batcher.h"

namespace pollen::node {

class BlockSpan;
class StepMailbox;

// Parameters a client requests when it opens a session.
struct SessionRequest {
  std::string session_id;
  int from = 0;  // first block, absolute index
  int to = 0;    // one past the last block
  int64_t batch_size = 1;
  int64_t max_length = 0;
  // LoRA updates applied on every step, by absolute block index, in the
  // span's dtype and device; empty for none.
  std::map<int, BlockAdapter> adapters;
  // Destination of the steps that other nodes push for this session: the
  // stream that opened it. Null rejects pushes.
  std::shared_ptr<StepMailbox> mailbox;
};

// One client's state on this node: the span it opened on, the KV cache of
// blocks [from, to) and the number of positions it holds. A session is used
// by one stream at a time; `mu` serialises its steps against the idle reaper
// and against closing.
struct Session {
  SessionRequest request;
  int64_t reserved_tokens = 0;  // batch_size * max_length
  // Identity of the span the session opened on, for comparisons only. While
  // the session is in its manager, `span` below keeps that span alive, so
  // the address cannot be reused by another span.
  const BlockSpan* span_key = nullptr;
  // Set when the node moved away from the session's span, so that responses
  // carry `draining` and the client moves the session. Shutdown sets
  // ServiceContext::draining instead.
  std::atomic<bool> draining{false};

  absl::Mutex mu;
  // The span the session runs on, kept after the node moves to another
  // span; null once the session is closed.
  std::shared_ptr<const BlockSpan> span ABSL_GUARDED_BY(mu);
  int64_t position ABSL_GUARDED_BY(mu) = 0;
  std::vector<LayerKvCache> cache ABSL_GUARDED_BY(mu);  // one per block
  absl::Time last_used ABSL_GUARDED_BY(mu);
  // Set when the session was freed (closed or idle too long); its cache and
  // span are released and further steps fail.
  bool closed ABSL_GUARDED_BY(mu) = false;
  std::string closed_reason ABSL_GUARDED_BY(mu);
};

struct SessionLimits {
  // Cache tokens (batch * positions) all open sessions may reserve together.
  int64_t cache_token_budget = 0;
  // Sessions with no step for this long are freed.
  absl::Duration idle_timeout = absl::Seconds(300);
  // Largest batch one session may use.
  int64_t max_batch_size = 64;
  // Maximum tokens (sequences x new tokens) in one forward pass. Longer
  // steps run in chunks of this size (StepBatcherOptions::max_pass_tokens).
  int64_t prefill_chunk_tokens = 512;
};

// Owns the open sessions of a node, which may run on different spans while
// the node moves, and runs their steps. The cache budget is shared by all
// of them. Thread-safe.
class SessionManager {
 public:
  explicit SessionManager(SessionLimits limits);

  // Reserves the cache for a new session on `span`, which must cover blocks
  // [request.from, request.to). The session keeps `span` alive until it is
  // closed. Returns ALREADY_EXISTS for a duplicate id and RESOURCE_EXHAUSTED
  // when the budget is short, naming the tokens requested and left.
  absl::StatusOr<std::shared_ptr<Session>> Open(
      const SessionRequest& request, std::shared_ptr<const BlockSpan> span);

  // Runs a step of an open session, batched with the steps of other
  // sessions that wait at the same time (see StepBatcher). task.done gets
  // the output, or NOT_FOUND when the session was closed, ABORTED when the
  // position is not the session's, INVALID_ARGUMENT past max_length, and
  // INTERNAL or RESOURCE_EXHAUSTED when libtorch fails. The session's
  // position advances when the step succeeds.
  void SubmitStep(StepTask task) { batcher_.Submit(std::move(task)); }
  void SubmitSteps(std::vector<StepTask> tasks) {
    batcher_.Submit(std::move(tasks));
  }

  // Says that the client of `session` will send no more steps, so that
  // passes stop waiting for them. Close does this too.
  void EndSteps(const Session& session) { batcher_.Forget(&session); }

  // Returns the open session `session_id`, or NOT_FOUND naming it.
  absl::StatusOr<std::shared_ptr<Session>> Find(
      const std::string& session_id) const;

  // Frees a session's cache, span and budget. Unknown ids are ignored.
  void Close(const std::string& session_id, const std::string& reason);

  // Frees sessions idle since before now - idle_timeout that are not in the
  // middle of a step. Returns how many were freed.
  int CloseIdle(absl::Time now);

  // Sets `draining` on every session opened on `span`, or on every session
  // when `span` is null. Returns how many sessions it marked.
  int MarkDraining(const BlockSpan* span);

  // Closes every session opened on `span`, waiting for steps in progress.
  // Returns how many it closed.
  int CloseSessionsOn(const BlockSpan* span, const std::string& reason);

  // Number of open sessions on `span`.
  int CountSessionsOn(const BlockSpan* span) const;

  const StepBatcher& batcher() const { return batcher_; }

  int64_t cache_tokens_left() const;
  int64_t cache_tokens_total() const { return limits_.cache_token_budget; }
  int open_sessions() const;
  const SessionLimits& limits() const { return limits_; }

 private:
  // Ids of the open sessions on `span` (all of them when `span` is null).
  std::vector<std::string> SessionIdsOn(const BlockSpan* span) const;

  const SessionLimits limits_;
  StepBatcher batcher_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  int64_t reserved_tokens_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace pollen::node
