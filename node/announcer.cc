#include "node/announcer.h"

#include <utility>

#include "node/block_span.h"
#include "node/next_hop_prober.h"
#include "node/session_manager.h"

namespace pollen::node {

Announcer::Announcer(DhtRegistry* registry, const ServiceContext* context,
                     const NextHopProber* prober, RecordInfo info)
    : registry_(registry),
      context_(context),
      prober_(prober),
      info_(std::move(info)) {}

v1::NodeRecord Announcer::MakeRecord(v1::NodeState state) const {
  const std::shared_ptr<const BlockSpan> span = context_->spans.current();
  const absl::Time now = absl::Now();

  v1::NodeRecord record;
  record.set_model_id(context_->model_id);
  record.mutable_blocks()->set_start(span->start());
  record.mutable_blocks()->set_end(span->end());
  record.set_node_id(context_->node_id);
  record.set_address(info_.address);
  record.set_public_name(info_.public_name);
  record.set_state(state);
  record.set_throughput(info_.throughput.decode_steps_per_s);
  record.set_prefill_throughput(info_.throughput.prefill_tokens_per_s);
  record.set_cache_tokens_left(
      state == v1::NODE_STATE_OFFLINE
          ? 0
          : static_cast<uint64_t>(context_->sessions->cache_tokens_left()));
  record.set_announced_ms(absl::ToUnixMillis(now));
  record.set_expires_ms(absl::ToUnixMillis(now + info_.record_ttl));
  record.set_version(PollenVersion());
  record.set_num_blocks(static_cast<uint32_t>(context_->config.num_hidden_layers));
  record.set_device(info_.device);
  record.set_dtype(info_.dtype);
  record.set_quantization(info_.quantization);
  if (prober_ != nullptr) {
    for (const auto& [node_id, rtt_ms] : prober_->RoundTripTimesMs()) {
      (*record.mutable_next_rtt_ms())[node_id] = rtt_ms;
    }
  }
  return record;
}

absl::Status Announcer::Announce(v1::NodeState state, absl::Duration timeout) {
  absl::MutexLock lock(&announce_mu_);
  return registry_->Announce(MakeRecord(state), timeout);
}

}  // namespace pollen::node
