#include "scheduler/simulator/synthetic_swarm.h"

#include <algorithm>
#include <cmath>
#include <iterator>

#include "absl/strings/str_format.h"
#include "scheduler/placement.h"

namespace pollen::scheduler {
namespace {

// Device classes of volunteer nodes. The shares, memory reserves and the
// fraction of memory bandwidth a decode step achieves are assumptions of
// this simulator, not measurements. Bandwidths are the vendors' figures for
// RTX 3090/4090, RTX A6000/L40 and A100/H100 PCIe class cards, and a
// typical dual-channel to quad-channel server CPU.
struct DeviceClass {
  const char* name;
  double share;
  double memory_gb;
  double reserve_gb;      // CUDA context, activations, or the OS
  double bandwidth_gb_s;  // memory bandwidth
  double sigma;           // of the log-normal spread of throughput
};

constexpr DeviceClass kDeviceClasses[] = {
    {"gpu-24gb", 0.40, 24, 2, 950, 0.3},
    {"gpu-48gb", 0.25, 48, 2, 800, 0.3},
    {"gpu-80gb", 0.15, 80, 3, 2000, 0.3},
    {"cpu-64gb", 0.20, 64, 8, 60, 0.4},
};

// A decode step streams each block's weights once, at this fraction of the
// memory bandwidth (an assumption).
constexpr double kBandwidthEfficiency = 0.5;

constexpr double kRegionShares[kNumRegions] = {0.25, 0.10, 0.20, 0.30, 0.15};

// Base RTT between regions in milliseconds, typical of public cloud regions
// (an assumption). Within a region the base is 0, and the two last miles
// (0.5 to 5 ms each) make intra-region RTTs 1-10 ms.
constexpr double kRegionRttMs[kNumRegions][kNumRegions] = {
    {0, 25, 60, 80, 150},   {25, 0, 40, 100, 130},   {60, 40, 0, 140, 110},
    {80, 100, 140, 0, 150}, {150, 130, 110, 150, 0},
};

constexpr double kClientLastMileMs = 2;

template <size_t N>
int DrawByShare(const double (&shares)[N], SimulationRandom& random) {
  double draw = random.Uniform();
  for (size_t i = 0; i + 1 < N; ++i) {
    if (draw < shares[i]) return static_cast<int>(i);
    draw -= shares[i];
  }
  return N - 1;
}

NodeProfile DrawNode(const SimulationOptions& options, int index,
                     double join_minute, SimulationRandom& random) {
  double device_shares[std::size(kDeviceClasses)];
  for (size_t i = 0; i < std::size(kDeviceClasses); ++i) {
    device_shares[i] = kDeviceClasses[i].share;
  }
  const DeviceClass& device =
      kDeviceClasses[DrawByShare(device_shares, random)];

  NodeProfile node;
  node.node_id = absl::StrFormat("node-%05d", index);
  node.device = device.name;
  const double block_gb = options.model.block_bytes / 1e9;
  node.throughput = device.bandwidth_gb_s * kBandwidthEfficiency / block_gb *
                    std::exp(device.sigma * random.Normal());
  const int fit = BlocksThatFit(
      static_cast<int64_t>(device.memory_gb * 1e9), options.model.block_bytes,
      options.model.kv_bytes_per_token * options.cache_tokens,
      static_cast<int64_t>(device.reserve_gb * 1e9));
  node.length = std::min(fit, options.model.num_blocks);
  node.region = DrawByShare(kRegionShares, random);
  node.last_mile_ms = random.Uniform(0.5, 5);
  node.join_minute = join_minute;
  node.check_phase_minutes = random.Uniform(0, options.check_period_minutes);
  return node;
}

}  // namespace

double SimulationRandom::Uniform() {
  return static_cast<double>(engine_() >> 11) * 0x1.0p-53;
}

double SimulationRandom::Uniform(double low, double high) {
  return low + (high - low) * Uniform();
}

double SimulationRandom::Normal() {
  // Box-Muller; 1 - Uniform() is in (0, 1], so the log is finite.
  const double radius = std::sqrt(-2 * std::log(1 - Uniform()));
  return radius * std::cos(2 * M_PI * Uniform());
}

int SimulationRandom::Poisson(double mean) {
  // Knuth's product of uniforms, in chunks so that exp(-chunk) stays normal.
  int count = 0;
  while (mean > 0) {
    const double chunk = std::min(mean, 30.0);
    mean -= chunk;
    const double limit = std::exp(-chunk);
    double product = Uniform();
    while (product > limit) {
      ++count;
      product *= Uniform();
    }
  }
  return count;
}

size_t SimulationRandom::Index(size_t size) {
  return std::min(static_cast<size_t>(Uniform() * static_cast<double>(size)),
                  size - 1);
}

std::string RegionName(int region) {
  static const char* const kNames[kNumRegions] = {"na-east", "na-central",
                                                  "na-west", "europe", "asia"};
  return region >= 0 && region < kNumRegions ? kNames[region] : "unknown";
}

SwarmTimeline BuildSwarmTimeline(const SimulationOptions& options) {
  SimulationRandom random(options.seed);
  const int minutes = static_cast<int>(std::lround(options.hours * 60));
  SwarmTimeline timeline;
  timeline.joins_by_minute.resize(minutes);
  timeline.leaves_by_minute.resize(minutes);

  // Initial nodes, joining during the warm-up. Nodes whose memory fits no
  // block never join and are not counted.
  const auto add_node = [&](double join_minute) {
    NodeProfile node = DrawNode(
        options, static_cast<int>(timeline.nodes.size()), join_minute, random);
    if (node.length <= 0) return;
    const int minute = static_cast<int>(join_minute);
    if (minute >= minutes) return;
    timeline.joins_by_minute[minute].push_back(
        static_cast<int>(timeline.nodes.size()));
    timeline.nodes.push_back(std::move(node));
  };
  for (int i = 0; i < options.nodes; ++i) {
    add_node(random.Uniform(0, options.warmup_minutes));
  }

  // Churn after the warm-up: leaves among the nodes that joined before this
  // minute, and joins at the rate that keeps the expected count.
  std::vector<int> present;
  const double rate_per_minute = options.churn_per_hour / 60;
  for (int minute = 0; minute < minutes; ++minute) {
    if (minute > 0) {
      for (int index : timeline.joins_by_minute[minute - 1]) {
        present.push_back(index);
      }
    }
    if (minute < options.warmup_minutes) continue;

    const int leaving = std::min<int>(
        random.Poisson(rate_per_minute * present.size()), present.size());
    for (int i = 0; i < leaving; ++i) {
      const size_t pick = random.Index(present.size());
      const int index = present[pick];
      timeline.nodes[index].leave_minute = minute;
      timeline.leaves_by_minute[minute].push_back(index);
      present[pick] = present.back();
      present.pop_back();
    }
    std::sort(timeline.leaves_by_minute[minute].begin(),
              timeline.leaves_by_minute[minute].end());

    const int joining = random.Poisson(rate_per_minute * options.nodes);
    for (int i = 0; i < joining; ++i) {
      add_node(minute + random.Uniform());
    }
  }

  for (std::vector<int>& joins : timeline.joins_by_minute) {
    std::sort(joins.begin(), joins.end(), [&timeline](int a, int b) {
      return timeline.nodes[a].join_minute < timeline.nodes[b].join_minute;
    });
  }
  return timeline;
}

double NodeRttMs(const NodeProfile& a, const NodeProfile& b) {
  return kRegionRttMs[a.region][b.region] + a.last_mile_ms + b.last_mile_ms;
}

double ClientRttMs(int client_region, const NodeProfile& node) {
  return kRegionRttMs[client_region][node.region] + kClientLastMileMs +
         node.last_mile_ms;
}

}  // namespace pollen::scheduler
