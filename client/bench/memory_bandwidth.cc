#include "client/bench/memory_bandwidth.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"

namespace pollen::bench {
namespace {

// Receives every sum, so that the compiler cannot drop the reads.
std::atomic<uint64_t> sum_sink{0};

// Runs work(thread, begin, end) on `threads` threads, each over its
// contiguous share of [0, count), and waits for all of them.
void RunSplit(int threads, size_t count,
              const std::function<void(size_t, size_t)>& work) {
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    const size_t begin = count * t / threads;
    const size_t end = count * (t + 1) / threads;
    workers.emplace_back(work, begin, end);
  }
  for (std::thread& worker : workers) worker.join();
}

}  // namespace

std::string MemoryBandwidth::Describe() const {
  return absl::StrFormat(
      "%d threads summing a %d MiB buffer of 64-bit words in %d streams "
      "each, best of %d passes",
      threads, buffer_bytes >> 20, kReadStreams, passes);
}

uint64_t SumWords(const uint64_t* words, size_t count) {
  // Words per stream, a multiple of 4; the rest is summed at the end.
  const size_t part = count / kReadStreams / 4 * 4;
  uint64_t sums[kReadStreams] = {};
  for (size_t i = 0; i < part; i += 4) {
    for (int stream = 0; stream < kReadStreams; ++stream) {
      const uint64_t* block = words + stream * part + i;
      sums[stream] += (block[0] + block[1]) + (block[2] + block[3]);
    }
  }
  uint64_t total = 0;
  for (const uint64_t sum : sums) total += sum;
  for (size_t i = part * kReadStreams; i < count; ++i) total += words[i];
  return total;
}

absl::StatusOr<MemoryBandwidth> MeasureMemoryBandwidth(
    const MemoryBandwidthOptions& options) {
  constexpr int64_t kMinBufferBytes = int64_t{1} << 20;
  if (options.buffer_bytes < kMinBufferBytes || options.passes < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory bandwidth needs a buffer of at least ", kMinBufferBytes,
        " bytes and at least 1 pass; got ", options.buffer_bytes, " bytes and ",
        options.passes, " passes"));
  }
  const int threads =
      options.threads > 0
          ? options.threads
          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const size_t count = static_cast<size_t>(options.buffer_bytes) / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buffer(new (std::nothrow) uint64_t[count]);
  if (buffer == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot allocate ", options.buffer_bytes,
        " bytes to measure memory bandwidth"));
  }

  // Each thread writes the share it later reads, so that on NUMA machines
  // its pages sit on its own node.
  uint64_t* words = buffer.get();
  RunSplit(threads, count, [words](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) words[i] = i;
  });

  double best_seconds = 0;
  for (int pass = 0; pass < options.passes; ++pass) {
    const auto started = std::chrono::steady_clock::now();
    RunSplit(threads, count, [words](size_t begin, size_t end) {
      sum_sink.fetch_add(SumWords(words + begin, end - begin),
                         std::memory_order_relaxed);
    });
    const double seconds = std::chrono::duration<double>(
                               std::chrono::steady_clock::now() - started)
                               .count();
    if (pass == 0 || seconds < best_seconds) best_seconds = seconds;
  }

  MemoryBandwidth result;
  result.threads = threads;
  result.buffer_bytes = static_cast<int64_t>(count * sizeof(uint64_t));
  result.passes = options.passes;
  result.bytes_per_s =
      static_cast<double>(result.buffer_bytes) / std::max(best_seconds, 1e-9);
  POLLEN_LOG_INFO("memory read bandwidth {:.2f} GB/s ({})",
                  result.bytes_per_s / 1e9, result.Describe());
  return result;
}

}  // namespace pollen::bench
