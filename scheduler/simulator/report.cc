#include "scheduler/simulator/report.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"

namespace pollen::scheduler {
namespace {

double Balance(const TickStats& tick) {
  return tick.upper_bound > 0 ? tick.min_throughput / tick.upper_bound : 0;
}

std::string EscapeXml(absl::string_view text) {
  return absl::StrReplaceAll(
      text, {{"&", "&amp;"}, {"<", "&lt;"}, {">", "&gt;"}, {"\"", "&quot;"}});
}

}  // namespace

std::string FormatSummaryTable(const std::vector<SimulationResult>& results) {
  std::string table = absl::StrFormat(
      "%-7s %9s %9s %5s %10s %10s %8s %9s %9s %9s %9s %7s %9s\n", "policy",
      "coverage", "min cov.", "gaps", "min tput", "bound", "balance", "lowest",
      "route ms", "best ms", "fewest ms", "moves", "moves/n-h");
  for (const SimulationResult& result : results) {
    const SimulationSummary& s = result.summary;
    absl::StrAppend(
        &table,
        absl::StrFormat(
            "%-7s %9.4f %9.4f %5d %10.1f %10.1f %8.3f %9.3f %9.1f %9.1f "
            "%9.1f %7d %9.3f\n",
            PolicyName(result.policy), s.mean_coverage, s.min_coverage,
            s.gap_minutes, s.mean_min_throughput, s.mean_upper_bound,
            s.mean_balance, s.lowest_balance, s.mean_route_ms,
            s.mean_optimal_ms, s.mean_fewest_hops_ms, s.moves,
            s.moves_per_node_hour));
  }
  return table;
}

std::string FormatTicksCsv(const std::vector<SimulationResult>& results) {
  std::string csv =
      "policy,minute,nodes_present,nodes_serving,coverage,min_throughput,"
      "upper_bound,balance,moves,routed,route_ms,optimal_ms,fewest_hops_ms,"
      "route_hops\n";
  for (const SimulationResult& result : results) {
    for (const TickStats& tick : result.ticks) {
      absl::StrAppend(
          &csv, absl::StrFormat(
                    "%s,%d,%d,%d,%.6f,%.4f,%.4f,%.6f,%d,%d,%.3f,%.3f,"
                    "%.3f,%d\n",
                    PolicyName(result.policy), tick.minute, tick.nodes_present,
                    tick.nodes_serving, tick.coverage, tick.min_throughput,
                    tick.upper_bound, Balance(tick), tick.moves,
                    tick.routed ? 1 : 0, tick.route_ms, tick.optimal_ms,
                    tick.fewest_hops_ms, tick.route_hops));
    }
  }
  return csv;
}

std::string RenderBalanceSvg(const std::vector<SimulationResult>& results,
                             absl::string_view title) {
  constexpr int kWidth = 760;
  constexpr int kHeight = 360;
  constexpr int kLeft = 64;
  constexpr int kRight = 150;
  constexpr int kTop = 40;
  constexpr int kBottom = 50;
  constexpr int kPlotWidth = kWidth - kLeft - kRight;
  constexpr int kPlotHeight = kHeight - kTop - kBottom;
  static const char* const kColors[] = {"#1b7837", "#762a83", "#e08214",
                                        "#2166ac"};

  int last_minute = 1;
  for (const SimulationResult& result : results) {
    if (!result.ticks.empty()) {
      last_minute = std::max(last_minute, result.ticks.back().minute + 1);
    }
  }
  const auto x_of = [&](double minute) {
    return kLeft + kPlotWidth * minute / last_minute;
  };
  const auto y_of = [&](double balance) {
    return kTop + kPlotHeight * (1 - std::clamp(balance, 0.0, 1.0));
  };

  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
      "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
      "<text x=\"%d\" y=\"22\" font-size=\"14\">%s</text>\n",
      kWidth, kHeight, kWidth, kHeight, kLeft, EscapeXml(title));

  // Horizontal grid with balance labels.
  for (int i = 0; i <= 4; ++i) {
    const double balance = i / 4.0;
    absl::StrAppend(
        &svg,
        absl::StrFormat("<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" "
                        "stroke=\"#dddddd\"/>\n<text x=\"%d\" y=\"%.1f\" "
                        "text-anchor=\"end\">%.2f</text>\n",
                        kLeft, y_of(balance), kLeft + kPlotWidth, y_of(balance),
                        kLeft - 6, y_of(balance) + 4, balance));
  }

  // Hour ticks, at most about twelve.
  const double hours = last_minute / 60.0;
  double step = 1;
  for (double candidate : {1.0, 2.0, 3.0, 4.0, 6.0, 12.0, 24.0, 48.0, 168.0}) {
    step = candidate;
    if (hours / candidate <= 12) break;
  }
  if (hours < 1) step = 0.25;
  for (double hour = 0; hour <= hours + 1e-9; hour += step) {
    absl::StrAppend(
        &svg,
        absl::StrFormat("<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" "
                        "stroke=\"#888888\"/>\n<text x=\"%.1f\" y=\"%d\" "
                        "text-anchor=\"middle\">%g</text>\n",
                        x_of(hour * 60), kTop + kPlotHeight, x_of(hour * 60),
                        kTop + kPlotHeight + 5, x_of(hour * 60),
                        kTop + kPlotHeight + 20, hour));
  }
  absl::StrAppend(
      &svg,
      absl::StrFormat(
          "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" "
          "stroke=\"#444444\"/>\n"
          "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">hours</text>\n"
          "<text transform=\"translate(16 %d) rotate(-90)\" "
          "text-anchor=\"middle\">min block throughput / upper bound</text>\n",
          kLeft, kTop, kPlotWidth, kPlotHeight, kLeft + kPlotWidth / 2,
          kHeight - 10, kTop + kPlotHeight / 2));

  // One polyline and legend entry per result.
  for (size_t r = 0; r < results.size(); ++r) {
    const char* color = kColors[r % std::size(kColors)];
    // Points inside a flat run add nothing to the line, so they are left
    // out to keep the file small.
    const std::vector<TickStats>& ticks = results[r].ticks;
    std::vector<std::string> ys;
    for (const TickStats& tick : ticks) {
      ys.push_back(absl::StrFormat("%.1f", y_of(Balance(tick))));
    }
    std::string points;
    for (size_t i = 0; i < ticks.size(); ++i) {
      const bool flat = i > 0 && i + 1 < ticks.size() && ys[i] == ys[i - 1] &&
                        ys[i] == ys[i + 1];
      if (flat) continue;
      absl::StrAppend(
          &points,
          absl::StrFormat("%.1f,%s ", x_of(ticks[i].minute + 1), ys[i]));
    }
    const int legend_y = kTop + 10 + 20 * static_cast<int>(r);
    absl::StrAppend(
        &svg,
        absl::StrFormat(
            "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" "
            "points=\"%s\"/>\n"
            "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" "
            "stroke-width=\"3\"/>\n<text x=\"%d\" y=\"%d\">%s</text>\n",
            color, points, kLeft + kPlotWidth + 12, legend_y,
            kLeft + kPlotWidth + 36, legend_y, color, kLeft + kPlotWidth + 42,
            legend_y + 4, PolicyName(results[r].policy)));
  }
  absl::StrAppend(&svg, "</svg>\n");
  return svg;
}

}  // namespace pollen::scheduler
