// Text, CSV and SVG renderings of simulation results.
#pragma once

#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "scheduler/simulator/simulator.h"

namespace pollen::scheduler {

// Returns a fixed-width table with one row per result's summary.
std::string FormatSummaryTable(const std::vector<SimulationResult>& results);

// Returns one CSV row per result and minute, after a header line.
std::string FormatTicksCsv(const std::vector<SimulationResult>& results);

// Returns a standalone SVG line chart of min_throughput / upper_bound over
// time, one line per result, titled `title`.
std::string RenderBalanceSvg(const std::vector<SimulationResult>& results,
                             absl::string_view title);

}  // namespace pollen::scheduler
