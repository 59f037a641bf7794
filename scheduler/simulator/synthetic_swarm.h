// The synthetic swarm behind the simulator: device classes, regions and
// RTTs, and the join and leave times of every node. None of it depends on
// the placement policy, so every policy runs over the same swarm.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "scheduler/simulator/simulator.h"

namespace pollen::scheduler {

// Draws from a std::mt19937_64 with fixed formulas, so that results do not
// depend on how the standard library implements its distributions.
// Thread-compatible.
class SimulationRandom {
 public:
  explicit SimulationRandom(uint64_t seed) : engine_(seed) {}

  double Uniform();  // [0, 1)
  double Uniform(double low, double high);
  double Normal();  // mean 0, standard deviation 1
  int Poisson(double mean);
  size_t Index(size_t size);  // uniform in [0, size), size > 0

  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

inline constexpr int kNumRegions = 5;

// Returns a short name for `region`, e.g. "europe".
std::string RegionName(int region);

// One node of the synthetic swarm.
struct NodeProfile {
  std::string node_id;
  std::string device;     // device class name
  double throughput = 0;  // decode steps per second through one block
  int length = 0;         // blocks it serves: what fits, at most all
  int region = 0;
  double last_mile_ms = 0;  // added to every RTT to or from the node
  double join_minute = 0;
  int leave_minute = -1;  // -1 when it stays to the end
  // Minutes after joining of its first placement check.
  double check_phase_minutes = 0;
};

struct SwarmTimeline {
  std::vector<NodeProfile> nodes;
  // Node indices that join during each minute, by join time.
  std::vector<std::vector<int>> joins_by_minute;
  // Node indices that leave at the start of each minute.
  std::vector<std::vector<int>> leaves_by_minute;
};

// Draws the nodes and their join and leave times. `options` must be valid.
SwarmTimeline BuildSwarmTimeline(const SimulationOptions& options);

// True round-trip times in milliseconds.
double NodeRttMs(const NodeProfile& a, const NodeProfile& b);
double ClientRttMs(int client_region, const NodeProfile& node);

}  // namespace pollen::scheduler
