// Conversion of announced NodeRecords into the spans the scheduler routes
// and places over.
#pragma once

#include <string>
#include <vector>

#include "pollen/v1/pollen.pb.h"
#include "scheduler/route.h"

namespace pollen {

// Returns one span per node serving `model_id`: the node's newest record,
// skipped when that record is not ONLINE, so that a withdrawn node is never
// brought back by an older announcement.
std::vector<scheduler::ServerSpan> SpansFromRecords(
    const std::vector<v1::NodeRecord>& records, const std::string& model_id);

}  // namespace pollen
