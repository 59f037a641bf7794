#include "scheduler/petals_policy.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace pollen::scheduler {
namespace {

// A span reduced to what the rebalancing simulation needs.
struct Placed {
  int start = 0;
  int length = 0;
  double throughput = 0;
};

Placed Clip(const ServerSpan& span, int num_blocks) {
  const int first = std::max(span.start, 0);
  const int last = std::min(span.end, num_blocks);
  const double throughput = span.throughput;
  return Placed{first, last - first,
                throughput > 0 && std::isfinite(throughput) ? throughput : 0};
}

void AddOn(std::vector<double>& throughputs, int start, int length,
           double amount) {
  for (int block = start; block < start + length; ++block) {
    throughputs[block] += amount;
  }
}

// Fisher-Yates with the top 53 bits of each draw, so the order depends only
// on `rng`'s state and not on the standard library.
void Shuffle(std::vector<int>& order, std::mt19937_64& rng) {
  for (size_t i = order.size(); i > 1; --i) {
    const double draw = static_cast<double>(rng() >> 11) * 0x1.0p-53;
    const size_t j = std::min(static_cast<size_t>(draw * i), i - 1);
    std::swap(order[i - 1], order[j]);
  }
}

// Lets every span re-choose its start, in shuffled rounds, until a round moves
// none. Returns the number of rounds run.
int Rebalance(std::vector<Placed>& placed, std::vector<double>& throughputs,
              std::mt19937_64& rng) {
  constexpr double kEps = kPetalsEpsilon;
  std::vector<int> order(placed.size());
  std::iota(order.begin(), order.end(), 0);

  int rounds = 0;
  bool moved = true;
  while (moved && rounds < kPetalsMaxRebalanceRounds) {
    ++rounds;
    moved = false;
    Shuffle(order, rng);
    for (int i : order) {
      Placed& span = placed[i];
      // Subtracting a little more than the span's own throughput makes its
      // current start win near-ties, as in Petals.
      AddOn(throughputs, span.start, span.length,
            -span.throughput * (1 + kEps));
      const int best = PetalsChooseBestStart(throughputs, span.length);
      AddOn(throughputs, span.start, span.length, span.throughput * kEps);
      if (best != span.start) {
        span.start = best;
        moved = true;
      }
      AddOn(throughputs, span.start, span.length, span.throughput);
    }
  }
  return rounds;
}

}  // namespace

int PetalsChooseBestStart(const std::vector<double>& block_throughputs,
                          int length) {
  const int num_blocks = static_cast<int>(block_throughputs.size());
  if (num_blocks == 0) return 0;
  length = std::clamp(length, 1, num_blocks);
  const int num_starts = num_blocks - length + 1;

  // The smallest element decides first, so only windows sharing the smallest
  // minimum need their full sorted sequences compared.
  std::vector<double> window_min(num_starts);
  for (int start = 0; start < num_starts; ++start) {
    window_min[start] =
        *std::min_element(block_throughputs.begin() + start,
                          block_throughputs.begin() + start + length);
  }
  const double lowest = *std::min_element(window_min.begin(), window_min.end());

  int best = -1;
  std::vector<double> best_sorted;
  std::vector<double> sorted;
  for (int start = 0; start < num_starts; ++start) {
    if (window_min[start] != lowest) continue;
    sorted.assign(block_throughputs.begin() + start,
                  block_throughputs.begin() + start + length);
    std::sort(sorted.begin(), sorted.end());
    if (best < 0 || sorted < best_sorted) {
      best = start;
      best_sorted.swap(sorted);
    }
  }
  return best;
}

int PetalsChooseSpanStart(const std::vector<ServerSpan>& others, int num_blocks,
                          int length) {
  if (num_blocks <= 0) return 0;
  return PetalsChooseBestStart(BlockThroughputs(others, num_blocks), length);
}

MoveDecision PetalsDecideMove(const std::vector<ServerSpan>& spans,
                              const std::string& self, int num_blocks,
                              double balance_quality, std::mt19937_64& rng) {
  if (num_blocks <= 0) return MoveDecision{};
  return PetalsDecideMoveForThroughputs(BlockThroughputs(spans, num_blocks),
                                        spans, self, balance_quality, rng);
}

MoveDecision PetalsDecideMoveForThroughputs(
    const std::vector<double>& block_throughputs,
    const std::vector<ServerSpan>& spans, const std::string& self,
    double balance_quality, std::mt19937_64& rng) {
  constexpr double kEps = kPetalsEpsilon;
  MoveDecision decision;
  const int num_blocks = static_cast<int>(block_throughputs.size());
  if (num_blocks == 0) return decision;

  // This node's span, clipped to [0, num_blocks) as Petals derives spans
  // from per-block records.
  const auto own_it =
      std::find_if(spans.begin(), spans.end(), [&](const ServerSpan& span) {
        return span.node_id == self &&
               std::max(span.start, 0) < std::min(span.end, num_blocks);
      });
  if (own_it == spans.end()) return decision;
  const Placed own = Clip(*own_it, num_blocks);

  const double initial_min = MinBlockThroughput(block_throughputs);
  decision.current_min = initial_min;
  decision.new_min = initial_min;
  decision.new_start = own.start;

  // The simulated minimum cannot exceed the mean, so a swarm already within
  // balance_quality of it never moves.
  const double mean =
      std::accumulate(block_throughputs.begin(), block_throughputs.end(), 0.0) /
      num_blocks;
  if (balance_quality <= 1.0 &&
      initial_min >= (balance_quality - kEps) * mean * (1 + 1e-9)) {
    return decision;
  }

  // Step 2: take this node out; stay if that would leave a block unserved.
  std::vector<double> throughputs = block_throughputs;
  AddOn(throughputs, own.start, own.length, -own.throughput * (1 + kEps));
  if (balance_quality <= 1.0 && initial_min > kEps &&
      MinBlockThroughput(throughputs) <= 0) {
    return decision;
  }

  // Step 3: where this node would go.
  const int best_start = PetalsChooseBestStart(throughputs, own.length);
  if (balance_quality > 1.0) {
    decision.move = true;
    decision.new_start = best_start;
    return decision;
  }
  if (best_start == own.start) return decision;

  // Step 4: simulate the move and everyone's reaction.
  std::vector<Placed> placed;
  placed.reserve(spans.size());
  for (auto it = spans.begin(); it != spans.end(); ++it) {
    const Placed span = Clip(*it, num_blocks);
    if (span.length <= 0) continue;
    placed.push_back(
        it == own_it ? Placed{best_start, own.length, own.throughput} : span);
  }
  AddOn(throughputs, own.start, own.length, own.throughput * kEps);
  AddOn(throughputs, best_start, own.length, own.throughput);
  Rebalance(placed, throughputs, rng);

  // Step 5: the balance quality rule.
  const double simulated_min = MinBlockThroughput(throughputs);
  decision.new_min = simulated_min;
  if (simulated_min < initial_min || simulated_min < kEps) return decision;
  if (initial_min / simulated_min < balance_quality - kEps) {
    decision.move = true;
    decision.new_start = best_start;
  }
  return decision;
}

}  // namespace pollen::scheduler
