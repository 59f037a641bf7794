#include "scheduler/route.h"

#include <algorithm>
#include <limits>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pollen::scheduler {
namespace {

bool IsUsable(const ServerSpan& span, const RouteOptions& options) {
  return span.start < span.end &&
         options.excluded_nodes.count(span.node_id) == 0 &&
         span.cache_tokens_left >= options.min_cache_tokens;
}

// True when `a` is the better of two hops that reach equally far.
bool IsPreferred(const ServerSpan& a, const ServerSpan& b) {
  return std::make_tuple(-a.cache_tokens_left, -a.throughput, a.node_id) <
         std::make_tuple(-b.cache_tokens_left, -b.throughput, b.node_id);
}

}  // namespace

std::vector<int> FindUnservedBlocks(const std::vector<ServerSpan>& spans,
                                    int start, int end) {
  std::vector<int> unserved;
  for (int block = start; block < end; ++block) {
    const bool served = std::any_of(
        spans.begin(), spans.end(), [block](const ServerSpan& span) {
          return span.start <= block && block < span.end;
        });
    if (!served) unserved.push_back(block);
  }
  return unserved;
}

std::string FormatBlockList(const std::vector<int>& blocks) {
  std::vector<std::string> ranges;
  for (size_t i = 0; i < blocks.size();) {
    size_t j = i;
    while (j + 1 < blocks.size() && blocks[j + 1] == blocks[j] + 1) ++j;
    ranges.push_back(j == i ? absl::StrCat(blocks[i])
                            : absl::StrCat(blocks[i], "-", blocks[j]));
    i = j + 1;
  }
  return absl::StrJoin(ranges, ", ");
}

absl::StatusOr<std::vector<RouteHop>> FindFewestHopsRoute(
    const std::vector<ServerSpan>& spans, int start, int end,
    const RouteOptions& options) {
  if (start >= end) {
    return absl::InvalidArgumentError(
        absl::StrCat("empty block range [", start, ", ", end, ")"));
  }

  std::vector<ServerSpan> usable;
  for (const ServerSpan& span : spans) {
    if (IsUsable(span, options)) usable.push_back(span);
  }
  const std::vector<int> unserved = FindUnservedBlocks(usable, start, end);
  if (!unserved.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "no usable node serves block", unserved.size() > 1 ? "s " : " ",
        FormatBlockList(unserved), " (", usable.size(), " of ", spans.size(),
        " announced spans usable)"));
  }

  // hops[p] is the fewest hops covering [p, end); next[p] the span taken
  // from p. A hop entering a span at p always runs to the span's end (or
  // `end`), because covering a shorter suffix never needs more hops.
  const int length = end - start;
  constexpr int kUnreachable = std::numeric_limits<int>::max();
  std::vector<int> hops(length + 1, kUnreachable);
  std::vector<int> next(length, -1);
  hops[length] = 0;
  for (int p = end - 1; p >= start; --p) {
    const int offset = p - start;
    for (size_t i = 0; i < usable.size(); ++i) {
      const ServerSpan& span = usable[i];
      if (span.start > p || span.end <= p) continue;
      const int reach = std::min(span.end, end) - start;
      if (hops[reach] == kUnreachable) continue;
      const int candidate = hops[reach] + 1;
      const bool better =
          candidate < hops[offset] ||
          (candidate == hops[offset] && IsPreferred(span, usable[next[offset]]));
      if (better) {
        hops[offset] = candidate;
        next[offset] = static_cast<int>(i);
      }
    }
  }

  std::vector<RouteHop> route;
  for (int p = start; p < end;) {
    const ServerSpan& span = usable[next[p - start]];
    const int hop_end = std::min(span.end, end);
    route.push_back(RouteHop{span, p, hop_end});
    p = hop_end;
  }
  return route;
}

}  // namespace pollen::scheduler
