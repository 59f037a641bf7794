// Memory read bandwidth: threads summing shares of a 1 GiB buffer, as
// `pollen bench` measures it.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>

#include "client/bench/memory_bandwidth.h"

namespace pollen::bench {
namespace {

constexpr size_t kBufferWords = (size_t{1} << 30) / sizeof(uint64_t);

// The buffer, allocated and written once for every run.
const uint64_t* Buffer() {
  static const std::unique_ptr<uint64_t[]> buffer = [] {
    std::unique_ptr<uint64_t[]> words(new uint64_t[kBufferWords]);
    for (size_t i = 0; i < kBufferWords; ++i) words[i] = i;
    return words;
  }();
  return buffer.get();
}

void BM_MemoryRead(benchmark::State& state) {
  const size_t share = kBufferWords / state.threads();
  const uint64_t* words = Buffer() + share * state.thread_index();
  for (auto _ : state) {
    benchmark::DoNotOptimize(SumWords(words, share));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * share *
                          sizeof(uint64_t));
}
BENCHMARK(BM_MemoryRead)->ThreadRange(1, 8)->ThreadPerCpu()->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace pollen::bench
