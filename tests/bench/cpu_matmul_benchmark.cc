// LinearFewRows, the product behind every decode step on the CPU, for 1 to
// 16 rows (batched sessions) with a TinyLlama-1.1B MLP weight.
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>

#include "common/cpu_matmul.h"

namespace pollen {
namespace {

void BM_LinearFewRows(benchmark::State& state) {
  const int64_t rows = state.range(0);
  const at::Tensor w = at::randn({5632, 2048});
  const at::Tensor x = at::randn({rows, 2048});
  for (auto _ : state) benchmark::DoNotOptimize(LinearFewRows(x, w));
  state.SetBytesProcessed(state.iterations() * w.nbytes());
  state.counters["GFLOP/s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * 2 * rows * w.numel() / 1e9,
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_LinearFewRows)
    ->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Arg(16)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace pollen
