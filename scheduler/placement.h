// Pollen's block placement: which contiguous blocks a node serves when it
// joins, and when it moves to other blocks.
//
// Pure functions over announced spans: no networking, no clocks, and
// randomness only through the caller's generator. The spans passed in are the
// swarm's current announcements; a node that is still loading blocks counts,
// because it has already claimed them.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "scheduler/route.h"

namespace pollen::scheduler {

// Returns the total throughput of each block in [0, num_blocks): the sum of
// the throughputs of the spans covering it, with throughputs that are 0 or
// less, infinite or NaN counting as 0. Parts of spans outside
// [0, num_blocks) are ignored.
std::vector<double> BlockThroughputs(const std::vector<ServerSpan>& spans,
                                     int num_blocks);

// Returns min(block_throughputs), or 0 when it is empty.
double MinBlockThroughput(const std::vector<double>& block_throughputs);

// Returns the start of the `length` blocks that a node with `throughput`
// should serve, given the other nodes' spans. `length` is clamped to
// [1, num_blocks], a throughput that BlockThroughputs would count as 0
// counts as 1 here, and the result is 0 when num_blocks <= 0.
//
// Each start s is scored by, first, the swarm's minimum block throughput
// after adding `throughput` on [s, s + length), and second, the sum over
// that window of 1/T_b - 1/(T_b + throughput), with T_b floored at
// throughput / 1000. The first score ties often, for example when two
// distant blocks share the minimum. The second breaks such ties in favour of
// windows of weak blocks. An unserved block scores 999 / throughput, about
// 100 times as much as a block served with a tenth of `throughput`, so
// joining nodes close gaps first.
//
// Jitter spreads nodes that choose at the same time without seeing each
// other. The candidates are the starts whose first score lies in the top
// `jitter` fraction of the range between the worst and best start. The
// second score narrows them the same way, and `rng` draws the result
// uniformly from those left. Measuring against the range rather than the
// best score matters in large swarms, where one node changes any score by a
// few percent, so a band relative to the best score would admit nearly every
// start. With jitter 0 the result maximises the minimum exactly, and `rng`
// only breaks exact ties.
int ChooseSpanStart(const std::vector<ServerSpan>& others, int num_blocks,
                    int length, double throughput, std::mt19937_64& rng,
                    double jitter = 0.05);

// ChooseSpanStart over precomputed block throughputs of the other nodes, of
// size num_blocks.
int ChooseSpanStartForThroughputs(const std::vector<double>& block_throughputs,
                                  int length, double throughput,
                                  std::mt19937_64& rng, double jitter = 0.05);

struct MoveDecision {
  bool move = false;
  // Where the node should start serving when `move` is true; its current
  // start otherwise.
  int new_start = 0;
  // The swarm's minimum block throughput now, and after the move to the best
  // start found (whether or not the node moves).
  double current_min = 0;
  double new_min = 0;
};

// Jitter that DecideMove passes to ChooseSpanStart.
inline constexpr double kMoveJitter = 0.05;

// Decides whether node `self` should serve other blocks. It removes `self`'s
// span, picks a start for a span of the same length with ChooseSpanStart
// (jitter kMoveJitter), and moves only when all of these hold:
//   1. the current start is not among the jittered candidates, so a node
//      already on a best-scoring start stays;
//   2. no block that only `self` serves becomes unserved, unless the new
//      span still covers it;
//   3. if every block is served now, the minimum block throughput after the
//      move exceeds min_gain times the current one (hysteresis, so 1.2 means
//      20% better). If some block is unserved now, the move must leave fewer
//      blocks unserved.
// The span of `self` is the first one with that node id. Returns move = false
// with zeros when `self` is absent or num_blocks <= 0.
MoveDecision DecideMove(const std::vector<ServerSpan>& spans,
                        const std::string& self, int num_blocks,
                        double min_gain, std::mt19937_64& rng);

// DecideMove for a node serving [own_start, own_end) with `own_throughput`,
// given `block_throughputs`, the BlockThroughputs of all spans including the
// node's own. Callers that decide for many nodes over one swarm compute the
// throughputs once.
MoveDecision DecideMoveForThroughputs(
    const std::vector<double>& block_throughputs, int own_start, int own_end,
    double own_throughput, double min_gain, std::mt19937_64& rng);

// Returns how many blocks fit into `memory_bytes`, that is
//   floor((memory_bytes - reserve_bytes) /
//         (block_bytes + cache_bytes_per_block)),
// or 0 when that is negative or the per-block size is not positive. A
// negative reserve counts as 0.
int BlocksThatFit(int64_t memory_bytes, int64_t block_bytes,
                  int64_t cache_bytes_per_block, int64_t reserve_bytes);

}  // namespace pollen::scheduler
