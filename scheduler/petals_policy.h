// Petals' block placement, re-implemented as a reference for comparing
// Pollen's placement against in the simulator.
//
// Source: src/petals/server/block_selection.py (choose_best_blocks,
// should_choose_other_blocks) and the Server defaults in
// src/petals/server/server.py of bigscience-workshop/petals at commit
// 02dfbc7. Pure functions like placement.h.
#pragma once

#include <random>
#include <string>
#include <vector>

#include "scheduler/placement.h"
#include "scheduler/route.h"

namespace pollen::scheduler {

// Petals' default Server balance_quality.
inline constexpr double kPetalsBalanceQuality = 0.75;

// Absolute and relative slack Petals uses in its move rule.
inline constexpr double kPetalsEpsilon = 1e-3;

// Cap on the rounds of the simulated rebalancing in PetalsDecideMove. Petals
// has no cap.
// NOTE: Petals' loop has no proven bound. The pollen-simulate runs behind
// docs/scale.md needed at most 18 rounds.
inline constexpr int kPetalsMaxRebalanceRounds = 100;

// Returns Petals' choose_best_blocks start: among all windows of `length`
// blocks (clamped to [1, size]), the one whose block throughputs, sorted
// ascending, form the lexicographically smallest sequence, so the node joins
// the weakest region. Ties go to the smallest start. Returns 0 when
// `block_throughputs` is empty.
int PetalsChooseBestStart(const std::vector<double>& block_throughputs,
                          int length);

// PetalsChooseBestStart over BlockThroughputs(others, num_blocks).
int PetalsChooseSpanStart(const std::vector<ServerSpan>& others, int num_blocks,
                          int length);

// Petals' should_choose_other_blocks for node `self` (the first span with that
// id). With T the block throughputs and eps = kPetalsEpsilon:
//   1. if balance_quality > 1, always move;
//   2. subtract self's throughput * (1 + eps) from its blocks. If min(T) was
//      above eps and some block drops to 0 or below, stay, because the swarm
//      would lose a block;
//   3. if PetalsChooseBestStart of the result is the current start, stay;
//   4. simulate the move, then let every node (self included) re-choose its
//      start in rounds, in an order shuffled with `rng` each round, until a
//      round moves no span;
//   5. stay if the simulated min(T) is below the current one or below eps;
//      otherwise move iff current_min / simulated_min < balance_quality - eps,
//      that is, when the swarm's weakest block could become more than about
//      1 / balance_quality times as strong (1.33 with the default).
// The returned new_start is the best start of step 3, found with this node's
// span removed. new_min is the simulated minimum, or current_min when the
// rule stayed before simulating.
//
// Unlike Petals, this first checks a bound the simulation cannot beat
// (every node keeps its length, so the simulated minimum is at most the mean
// block throughput) and stays when current_min >= (balance_quality - eps)
// times that mean. Petals would stay there too, so the decision is the same
// without simulating.
MoveDecision PetalsDecideMove(const std::vector<ServerSpan>& spans,
                              const std::string& self, int num_blocks,
                              double balance_quality, std::mt19937_64& rng);

// PetalsDecideMove with `block_throughputs` precomputed: it must equal
// BlockThroughputs(spans, block_throughputs.size()). Decisions that stay by
// the mean bound then cost O(spans + blocks).
MoveDecision PetalsDecideMoveForThroughputs(
    const std::vector<double>& block_throughputs,
    const std::vector<ServerSpan>& spans, const std::string& self,
    double balance_quality, std::mt19937_64& rng);

}  // namespace pollen::scheduler
