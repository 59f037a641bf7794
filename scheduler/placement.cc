#include "scheduler/placement.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace pollen::scheduler {
namespace {

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// Scores are equal when they differ by less than this fraction, so that
// rounding in sums of throughputs does not decide a tie.
constexpr double kTieTolerance = 1e-12;

// Unserved blocks count as having this fraction of the joining node's
// throughput in the second score, which then values them about 100 times as
// much as a block served with a tenth of the node's throughput.
constexpr double kThroughputFloor = 1e-3;

// Throughputs that are 0 or less, infinite or NaN count as 0.
double Contribution(double throughput) {
  return throughput > 0 && std::isfinite(throughput) ? throughput : 0;
}

void AddSpan(const ServerSpan& span, std::vector<double>& throughputs) {
  const int num_blocks = static_cast<int>(throughputs.size());
  const double contribution = Contribution(span.throughput);
  const int first = std::max(span.start, 0);
  const int last = std::min(span.end, num_blocks);
  for (int block = first; block < last; ++block) {
    throughputs[block] += contribution;
  }
}

int ClampLength(int length, int num_blocks) {
  return std::clamp(length, 1, std::max(num_blocks, 1));
}

// The two scores of every start of a `length`-block window, as described at
// ChooseSpanStart.
struct StartScores {
  std::vector<double> min_after;  // [num_blocks - length + 1]
  std::vector<double> relief;     // [num_blocks - length + 1]
};

StartScores ScoreStarts(const std::vector<double>& throughputs, int length,
                        double throughput) {
  const int num_blocks = static_cast<int>(throughputs.size());
  const double added = Contribution(throughput) > 0 ? throughput : 1;
  const double floor = added * kThroughputFloor;

  // prefix_min[i] = min(T[0, i)), suffix_min[i] = min(T[i, num_blocks)).
  std::vector<double> prefix_min(num_blocks + 1, kInfinity);
  std::vector<double> suffix_min(num_blocks + 1, kInfinity);
  for (int i = 0; i < num_blocks; ++i) {
    prefix_min[i + 1] = std::min(prefix_min[i], throughputs[i]);
  }
  for (int i = num_blocks - 1; i >= 0; --i) {
    suffix_min[i] = std::min(suffix_min[i + 1], throughputs[i]);
  }

  StartScores scores;
  const int num_starts = num_blocks - length + 1;
  scores.min_after.resize(num_starts);
  scores.relief.resize(num_starts);
  for (int start = 0; start < num_starts; ++start) {
    double inside_min = kInfinity;
    double relief = 0;
    for (int block = start; block < start + length; ++block) {
      const double before = throughputs[block];
      inside_min = std::min(inside_min, before + added);
      relief +=
          1 / std::max(before, floor) - 1 / std::max(before + added, floor);
    }
    scores.min_after[start] =
        std::min({prefix_min[start], suffix_min[start + length], inside_min});
    scores.relief[start] = relief;
  }
  return scores;
}

// Returns the indices among `indices` whose score lies in the top `jitter`
// fraction of the range between the worst and the best of them.
std::vector<int> WithinJitter(const std::vector<double>& score,
                              const std::vector<int>& indices, double jitter) {
  double best = -kInfinity;
  double worst = kInfinity;
  for (int i : indices) {
    best = std::max(best, score[i]);
    worst = std::min(worst, score[i]);
  }
  const double threshold = best -
                           std::clamp(jitter, 0.0, 1.0) * (best - worst) -
                           kTieTolerance * std::max(std::abs(best), 1.0);
  std::vector<int> kept;
  for (int i : indices) {
    if (score[i] >= threshold) kept.push_back(i);
  }
  return kept.empty() ? indices : kept;
}

std::vector<int> CandidateStarts(const std::vector<double>& throughputs,
                                 int length, double throughput, double jitter) {
  const StartScores scores = ScoreStarts(throughputs, length, throughput);
  std::vector<int> all(scores.min_after.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
  return WithinJitter(scores.relief,
                      WithinJitter(scores.min_after, all, jitter), jitter);
}

int PickUniform(const std::vector<int>& candidates, std::mt19937_64& rng) {
  const double draw = static_cast<double>(rng() >> 11) * 0x1.0p-53;
  const size_t index = std::min(
      static_cast<size_t>(draw * static_cast<double>(candidates.size())),
      candidates.size() - 1);
  return candidates[index];
}

}  // namespace

std::vector<double> BlockThroughputs(const std::vector<ServerSpan>& spans,
                                     int num_blocks) {
  std::vector<double> throughputs(std::max(num_blocks, 0), 0.0);
  for (const ServerSpan& span : spans) AddSpan(span, throughputs);
  return throughputs;
}

double MinBlockThroughput(const std::vector<double>& block_throughputs) {
  if (block_throughputs.empty()) return 0;
  return *std::min_element(block_throughputs.begin(), block_throughputs.end());
}

int ChooseSpanStartForThroughputs(const std::vector<double>& block_throughputs,
                                  int length, double throughput,
                                  std::mt19937_64& rng, double jitter) {
  const int num_blocks = static_cast<int>(block_throughputs.size());
  if (num_blocks == 0) return 0;
  const std::vector<int> candidates = CandidateStarts(
      block_throughputs, ClampLength(length, num_blocks), throughput, jitter);
  return PickUniform(candidates, rng);
}

int ChooseSpanStart(const std::vector<ServerSpan>& others, int num_blocks,
                    int length, double throughput, std::mt19937_64& rng,
                    double jitter) {
  if (num_blocks <= 0) return 0;
  return ChooseSpanStartForThroughputs(BlockThroughputs(others, num_blocks),
                                       length, throughput, rng, jitter);
}

MoveDecision DecideMove(const std::vector<ServerSpan>& spans,
                        const std::string& self, int num_blocks,
                        double min_gain, std::mt19937_64& rng) {
  const auto own = std::find_if(
      spans.begin(), spans.end(),
      [&self](const ServerSpan& span) { return span.node_id == self; });
  if (own == spans.end() || num_blocks <= 0) return MoveDecision{};
  return DecideMoveForThroughputs(BlockThroughputs(spans, num_blocks),
                                  own->start, own->end, own->throughput,
                                  min_gain, rng);
}

MoveDecision DecideMoveForThroughputs(
    const std::vector<double>& block_throughputs, int own_start, int own_end,
    double own_throughput, double min_gain, std::mt19937_64& rng) {
  MoveDecision decision;
  const int num_blocks = static_cast<int>(block_throughputs.size());
  if (num_blocks == 0) return decision;
  const std::vector<double>& with_self = block_throughputs;
  decision.current_min = MinBlockThroughput(with_self);

  // Throughputs without this node. Subtracting x from a rounded sum that
  // includes x never goes below 0, and a block only this node serves drops
  // to exactly 0.
  const double contribution = Contribution(own_throughput);
  const int first = std::clamp(own_start, 0, num_blocks);
  const int last = std::clamp(own_end, first, num_blocks);
  std::vector<double> without_self = with_self;
  for (int block = first; block < last; ++block) {
    without_self[block] = std::max(without_self[block] - contribution, 0.0);
  }

  // Best start for a span of the same length; staying wins when the current
  // start is a candidate.
  const int length = ClampLength(own_end - own_start, num_blocks);
  const int current_start = std::clamp(own_start, 0, num_blocks - length);
  const std::vector<int> candidates =
      CandidateStarts(without_self, length, own_throughput, kMoveJitter);
  decision.new_start = current_start;
  const bool stays = std::find(candidates.begin(), candidates.end(),
                               current_start) != candidates.end();
  const int target = stays ? current_start : PickUniform(candidates, rng);

  std::vector<double> after = without_self;
  for (int block = target; block < target + length; ++block) {
    after[block] += contribution;
  }
  decision.new_min = MinBlockThroughput(after);
  if (stays) return decision;

  // Rule 2: blocks only this node serves must stay served.
  for (int block = first; block < last; ++block) {
    const bool inside_new = target <= block && block < target + length;
    if (with_self[block] > 0 && without_self[block] <= 0 && !inside_new) {
      return decision;
    }
  }

  // Rule 3: hysteresis on the minimum, or fewer unserved blocks.
  bool better = false;
  if (decision.current_min > 0) {
    better = decision.new_min > min_gain * decision.current_min;
  } else {
    const auto unserved = [](const std::vector<double>& throughputs) {
      return std::count_if(throughputs.begin(), throughputs.end(),
                           [](double value) { return value <= 0; });
    };
    better = unserved(after) < unserved(with_self);
  }
  if (better) {
    decision.move = true;
    decision.new_start = target;
  }
  return decision;
}

int BlocksThatFit(int64_t memory_bytes, int64_t block_bytes,
                  int64_t cache_bytes_per_block, int64_t reserve_bytes) {
  if (block_bytes < 0 || cache_bytes_per_block < 0) return 0;
  reserve_bytes = std::max<int64_t>(reserve_bytes, 0);
  const int64_t per_block = block_bytes + cache_bytes_per_block;
  if (per_block <= 0 || memory_bytes <= reserve_bytes) return 0;
  const int64_t blocks = (memory_bytes - reserve_bytes) / per_block;
  return static_cast<int>(
      std::min<int64_t>(blocks, std::numeric_limits<int>::max()));
}

}  // namespace pollen::scheduler
