// The machine's memory read bandwidth, which bounds how fast a CPU can
// decode: every token reads every weight once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace pollen::bench {

struct MemoryBandwidthOptions {
  // Size of the buffer that is read. It must be much larger than the CPU
  // caches, or the result measures the caches.
  int64_t buffer_bytes = int64_t{1} << 30;
  // Reading threads; 0 means one per hardware thread.
  int threads = 0;
  // Timed passes over the buffer; the fastest counts.
  int passes = 5;
};

struct MemoryBandwidth {
  double bytes_per_s = 0;
  int threads = 0;
  int64_t buffer_bytes = 0;
  int passes = 0;

  // How it was measured, for reports, e.g. "2 threads summing a 1024 MiB
  // buffer of 64-bit words, best of 5 passes".
  std::string Describe() const;
};

// Fills a buffer of options.buffer_bytes (every page written, so reads hit
// real memory rather than the shared zero page), then times
// options.passes passes in which each thread sums its contiguous share of
// the buffer as 64-bit words. Each pass is timed from starting the threads
// to the last one finishing; the result is the fastest pass. Returns
// INVALID_ARGUMENT for a buffer under 1 MiB or a non-positive number of
// passes, and RESOURCE_EXHAUSTED when the buffer cannot be allocated.
absl::StatusOr<MemoryBandwidth> MeasureMemoryBandwidth(
    const MemoryBandwidthOptions& options);

// Parts of its share that each thread of the bandwidth pass reads side by
// side, because the hardware prefetchers follow several streams at once.
// On the 2-core EPYC of docs/benchmarks.md, two threads read 22.5 GB/s
// with one stream each, 25.4 with four and 27.0 with eight. A decode step
// of the 1.1B shape reads about 27 GB/s there.
inline constexpr int kReadStreams = 8;

// Sums `count` 64-bit words, reading kReadStreams equal parts side by
// side with a sum each, so that the loads, not the additions, limit the
// speed. The micro-benchmarks use it too.
uint64_t SumWords(const uint64_t* words, size_t count);

}  // namespace pollen::bench
