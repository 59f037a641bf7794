// Decode latency of stories260k in this process and through `pollen node`
// processes on loopback, and the aggregate speed of concurrent sessions on
// stories260k and on a larger model.
//
//   build/tests/bench/pollen_decode_benchmark --benchmark_filter=Local
//   build/tests/bench/pollen_decode_benchmark --benchmark_filter=Swarm
//   POLLEN_BENCH_MODEL=DIR build/tests/bench/pollen_decode_benchmark \
//       --benchmark_filter=LargeModel
//
// Each iteration is one decode step of one token. The swarm benchmarks
// talk to the nodes through InferenceChain on a fixed route, so that they
// time the hops and the blocks, not the DHT.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "absl/strings/str_cat.h"
#include "client/remote_chain.h"
#include "common/checkpoint.h"
#include "common/logging.h"
#include "node/block_span.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

// Maximum positions of one session; the benchmark then opens a new one.
constexpr int64_t kMaxLength = 256;
constexpr int64_t kPromptTokens = 8;

std::shared_ptr<const node::BlockSpan> LoadStories() {
  auto checkpoint = Checkpoint::Open(Stories260kDir());
  if (!checkpoint.ok()) std::abort();
  auto span = node::BlockSpan::Load(**checkpoint, 0,
                                    (*checkpoint)->config().num_hidden_layers,
                                    at::kFloat, at::kCPU);
  if (!span.ok()) std::abort();
  return std::shared_ptr<const node::BlockSpan>(std::move(*span));
}

// One decode step through every block of the span, in this process.
void BM_LocalDecode(benchmark::State& state) {
  at::set_num_threads(1);
  const auto span = LoadStories();
  const int blocks = span->end();
  const int64_t hidden_size = span->config().hidden_size;
  const at::Tensor prompt = at::randn({1, kPromptTokens, hidden_size});
  const at::Tensor token = at::randn({1, 1, hidden_size});

  std::vector<node::LayerKvCache> cache;
  int64_t position = 0;
  for (auto _ : state) {
    if (position == 0 || position == kMaxLength) {
      state.PauseTiming();
      cache = span->AllocateCache(0, blocks, 1, kMaxLength);
      if (!span->Forward(prompt, cache, 0, 0, blocks).ok()) std::abort();
      position = kPromptTokens;
      state.ResumeTiming();
    }
    auto output = span->Forward(token, cache, position, 0, blocks);
    if (!output.ok()) {
      state.SkipWithError(output.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(output->data_ptr());
    ++position;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LocalDecode)->Unit(benchmark::kMicrosecond);

// Nodes serving blocks [0, blocks) of a model in equal shares, started once
// per process for each setup.
class BenchSwarm {
 public:
  static BenchSwarm& Get(const std::string& model_dir, int blocks, int nodes) {
    static auto* swarms =
        new std::map<std::tuple<std::string, int, int>, std::unique_ptr<BenchSwarm>>();
    auto& slot = (*swarms)[{model_dir, blocks, nodes}];
    if (!slot) slot.reset(new BenchSwarm(model_dir, blocks, nodes));
    return *slot;
  }

  const std::vector<scheduler::RouteHop>& route() const { return route_; }
  ChannelPool& channels() { return channels_; }
  const std::string& model_id() const { return model_id_; }

 private:
  BenchSwarm(const std::string& model_dir, int blocks, int nodes)
      : model_id_(absl::StrCat("bench-", blocks, "-", nodes)) {
    for (int i = 0; i < nodes; ++i) {
      const int start = blocks * i / nodes;
      const int end = blocks * (i + 1) / nodes;
      std::vector<std::string> flags = {"--throughput", "100"};
      if (const char* threads = std::getenv("POLLEN_BENCH_NODE_THREADS")) {
        flags.insert(flags.end(), {"--threads", threads});
      }
      auto index = swarm_.StartNode(model_dir, model_id_, start, end, flags);
      if (!index.ok()) {
        fprintf(stderr, "%s\n", index.status().ToString().c_str());
        std::abort();
      }
      scheduler::RouteHop hop;
      hop.server.node_id = swarm_.node(*index).name;
      hop.server.address = swarm_.node(*index).address;
      hop.server.start = start;
      hop.server.end = end;
      hop.start = start;
      hop.end = end;
      route_.push_back(hop);
    }
  }

  const std::string model_id_;
  LocalSwarm swarm_;
  std::vector<scheduler::RouteHop> route_;
  ChannelPool channels_;
};

std::unique_ptr<client::InferenceChain> OpenChain(BenchSwarm& swarm) {
  client::ChainOptions options;
  options.model_id = swarm.model_id();
  options.max_length = kMaxLength;
  options.step_timeout = absl::Seconds(120);
  auto chain = client::InferenceChain::Open(swarm.channels(), swarm.route(),
                                            options);
  if (!chain.ok()) {
    fprintf(stderr, "%s\n", chain.status().ToString().c_str());
    std::abort();
  }
  return std::move(*chain);
}

// Decode steps of one session through `swarm`; with several benchmark
// threads, each thread is a session and the rate is the total.
void RunSwarmDecode(benchmark::State& state, BenchSwarm& swarm,
                    int64_t hidden_size) {
  const at::Tensor prompt = at::randn({1, kPromptTokens, hidden_size});
  const at::Tensor token = at::randn({1, 1, hidden_size});

  std::unique_ptr<client::InferenceChain> chain;
  for (auto _ : state) {
    if (chain == nullptr || chain->position() == kMaxLength) {
      state.PauseTiming();
      chain.reset();
      chain = OpenChain(swarm);
      if (!chain->Step(prompt).ok()) std::abort();
      state.ResumeTiming();
    }
    auto output = chain->Step(token);
    if (!output.ok()) {
      state.SkipWithError(output.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(output->data_ptr());
  }
  chain.reset();
  state.SetItemsProcessed(state.iterations());
}

// stories260k through range(0) nodes.
void BM_SwarmDecode(benchmark::State& state) {
  at::set_num_threads(1);
  RunSwarmDecode(state,
                 BenchSwarm::Get(Stories260kDir(), 5,
                                 static_cast<int>(state.range(0))),
                 64);
}
BENCHMARK(BM_SwarmDecode)
    ->Arg(1)
    ->Arg(3)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_SwarmDecode)
    ->Arg(3)
    ->Threads(8)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// A larger model on one node: POLLEN_BENCH_MODEL names a checkpoint folder,
// for instance one written by `pollen make-checkpoint --shape
// tinyllama-1.1b`, of which the node serves the first POLLEN_BENCH_BLOCKS
// blocks (2 by default). Compare the rate of 8 threads with that of 1.
// POLLEN_BENCH_NODE_THREADS sets the nodes' --threads in every benchmark.
void BM_LargeModelDecode(benchmark::State& state) {
  const char* model_dir = std::getenv("POLLEN_BENCH_MODEL");
  if (model_dir == nullptr) {
    state.SkipWithError("set POLLEN_BENCH_MODEL to a checkpoint folder");
    return;
  }
  const char* blocks = std::getenv("POLLEN_BENCH_BLOCKS");
  auto checkpoint = Checkpoint::Open(model_dir);
  if (!checkpoint.ok()) {
    state.SkipWithError(checkpoint.status().ToString().c_str());
    return;
  }
  RunSwarmDecode(state,
                 BenchSwarm::Get(model_dir, blocks == nullptr ? 2 : std::atoi(blocks), 1),
                 (*checkpoint)->config().hidden_size);
}
BENCHMARK(BM_LargeModelDecode)
    ->Threads(1)
    ->Threads(8)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace pollen::testing

BENCHMARK_MAIN();
