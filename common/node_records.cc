#include "common/node_records.h"

#include <map>
#include <utility>

namespace pollen {

std::vector<scheduler::ServerSpan> SpansFromRecords(
    const std::vector<v1::NodeRecord>& records, const std::string& model_id) {
  std::map<std::string, const v1::NodeRecord*> newest;
  for (const v1::NodeRecord& record : records) {
    if (record.model_id() != model_id) continue;
    const v1::NodeRecord*& slot = newest[record.node_id()];
    if (slot == nullptr || record.announced_ms() > slot->announced_ms()) {
      slot = &record;
    }
  }

  std::vector<scheduler::ServerSpan> spans;
  for (const auto& [node_id, record] : newest) {
    if (record->state() != v1::NODE_STATE_ONLINE) continue;
    scheduler::ServerSpan span;
    span.node_id = node_id;
    span.address = record->address();
    span.start = static_cast<int>(record->blocks().start());
    span.end = static_cast<int>(record->blocks().end());
    span.throughput = record->throughput();
    span.prefill_throughput = record->prefill_throughput();
    span.cache_tokens_left = static_cast<int64_t>(record->cache_tokens_left());
    span.next_rtt_ms.insert(record->next_rtt_ms().begin(),
                            record->next_rtt_ms().end());
    spans.push_back(std::move(span));
  }
  return spans;
}

}  // namespace pollen
