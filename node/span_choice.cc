#include "node/span_choice.h"

#include "common/node_records.h"

#include <dlfcn.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include <ATen/ATen.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "scheduler/placement.h"

namespace pollen::node {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr absl::Duration kFetchTimeout = absl::Seconds(10);

// Free memory of a CUDA device from the driver API (cuMemGetInfo_v2), which
// needs no CUDA headers at build time.
// NOTE: written for libtorch builds with CUDA and not yet run on a GPU; the
// Debian 12 libtorch this project builds against is CPU-only.
absl::StatusOr<int64_t> CudaFreeMemory(const at::Device& device) {
  // Allocating on the device makes libtorch create the device's primary
  // context and make it current on this thread, as cuMemGetInfo requires.
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("initialising ", device.str()), [&] {
        at::empty({1}, at::TensorOptions().device(device));
        return absl::OkStatus();
      }));
  void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (driver == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot load the CUDA driver libcuda.so.1 to read the free memory of ",
        device.str(), "; pass --num-blocks"));
  }
  using MemGetInfo = int (*)(size_t*, size_t*);
  auto mem_get_info =
      reinterpret_cast<MemGetInfo>(dlsym(driver, "cuMemGetInfo_v2"));
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  const int result =
      mem_get_info == nullptr ? -1 : mem_get_info(&free_bytes, &total_bytes);
  if (result != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuMemGetInfo failed with CUDA error ", result, " on ", device.str(),
        "; pass --num-blocks"));
  }
  return static_cast<int64_t>(free_bytes);
}

// "12.5 MiB".
std::string MiB(int64_t bytes) {
  return absl::StrFormat("%.1f MiB", static_cast<double>(bytes) / (1 << 20));
}

}  // namespace

int64_t BlockWeightBytes(const ModelConfig& config, at::ScalarType dtype,
                         Quantization quantization) {
  const int64_t hidden = config.hidden_size;
  const int64_t attention = config.num_attention_heads * config.head_dim;
  const int64_t key_value = config.num_key_value_heads * config.head_dim;
  const int64_t linear = hidden * attention                  // q_proj
                         + 2 * hidden * key_value            // k_proj, v_proj
                         + attention * hidden                // o_proj
                         + 3 * hidden * config.intermediate_size;  // MLP
  const int64_t norms = 2 * hidden;
  const int64_t element_bytes = static_cast<int64_t>(c10::elementSize(dtype));
  if (quantization == Quantization::kNone) {
    return (linear + norms) * element_bytes;
  }

  // One float32 scale per output row of qkv, o, gate_up and down.
  const int64_t output_rows = attention + 2 * key_value  // qkv
                              + hidden                   // o_proj
                              + 2 * config.intermediate_size  // gate_up
                              + hidden;                       // down_proj
  return linear + output_rows * 4 + norms * element_bytes;
}

absl::StatusOr<int64_t> ParseMemAvailable(const std::string& meminfo) {
  for (absl::string_view line : absl::StrSplit(meminfo, '\n')) {
    if (!absl::ConsumePrefix(&line, "MemAvailable:")) continue;
    const std::vector<absl::string_view> fields =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    int64_t kib = 0;
    if (fields.size() == 2 && fields[1] == "kB" &&
        absl::SimpleAtoi(fields[0], &kib) && kib >= 0) {
      return kib * 1024;
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot parse the MemAvailable line of /proc/meminfo: '",
        std::string(line), "'"));
  }
  return absl::InvalidArgumentError("/proc/meminfo has no MemAvailable line");
}

absl::StatusOr<int64_t> AvailableMemoryBytes(const at::Device& device) {
  if (device.is_cpu()) {
    std::ifstream file("/proc/meminfo");
    if (!file) {
      return absl::FailedPreconditionError(
          "cannot read /proc/meminfo to size the span; pass --num-blocks");
    }
    std::stringstream text;
    text << file.rdbuf();
    return ParseMemAvailable(text.str());
  }
  if (device.is_cuda()) return CudaFreeMemory(device);
  return absl::UnimplementedError(absl::StrCat(
      "cannot read the free memory of device ", device.str(),
      "; pass --num-blocks or --blocks"));
}

int64_t MemoryReserveBytes(int64_t available_bytes) {
  return kGiB + available_bytes / 10;
}

absl::StatusOr<int> ChooseSpanLength(int requested, const ModelConfig& config,
                                     at::ScalarType dtype,
                                     Quantization quantization,
                                     const at::Device& device,
                                     int64_t cache_tokens,
                                     std::string* reason) {
  const int num_blocks = static_cast<int>(config.num_hidden_layers);
  if (requested > 0) {
    const int length = std::min(requested, num_blocks);
    *reason = requested > num_blocks
                  ? absl::StrCat("--num-blocks ", requested,
                                 " capped at the model's ", num_blocks,
                                 " blocks")
                  : absl::StrCat("--num-blocks ", requested);
    return length;
  }

  POLLEN_ASSIGN_OR_RETURN(const int64_t available,
                          AvailableMemoryBytes(device));
  const int64_t block_bytes = BlockWeightBytes(config, dtype, quantization);
  const int64_t cache_bytes_per_block =
      cache_tokens * 2 * config.num_key_value_heads * config.head_dim *
      static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t reserve = MemoryReserveBytes(available);
  const int fit = scheduler::BlocksThatFit(available, block_bytes,
                                           cache_bytes_per_block, reserve);
  if (fit < 1) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "not even one block fits on ", device.str(), ": ", MiB(available),
        " free, minus a reserve of ", MiB(reserve), ", and one block needs ",
        MiB(block_bytes + cache_bytes_per_block),
        " of weights and KV cache; lower --cache-tokens, use a smaller "
        "--dtype or --quantize int8"));
  }
  const int length = std::min(fit, num_blocks);
  *reason = absl::StrCat(fit, " blocks fit in ", MiB(available), " free on ",
                         device.str(), " (", MiB(block_bytes),
                         " of weights and ", MiB(cache_bytes_per_block),
                         " of KV cache per block, ", MiB(reserve),
                         " reserved)");
  return length;
}

absl::StatusOr<v1::BlockRange> ChooseInitialSpan(
    DhtRegistry& registry, const std::string& model_id,
    const std::string& self_node_id, int num_blocks, int length,
    double throughput, std::mt19937_64& rng) {
  if (length < 1 || length > num_blocks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "span length ", length, " is outside 1..", num_blocks));
  }
  std::vector<v1::NodeRecord> records;
  absl::StatusOr<std::vector<v1::NodeRecord>> fetched =
      registry.FetchSpan(model_id, 0, num_blocks, kFetchTimeout);
  if (fetched.ok()) {
    records = std::move(*fetched);
  } else {
    POLLEN_LOG_WARN("could not read the swarm's records of {} ({}); choosing "
                    "a span as if no other node served it",
                    model_id, fetched.status().ToString());
  }

  std::vector<scheduler::ServerSpan> others;
  for (scheduler::ServerSpan& span : SpansFromRecords(records, model_id)) {
    if (span.node_id != self_node_id) others.push_back(std::move(span));
  }
  const int start = scheduler::ChooseSpanStart(others, num_blocks, length,
                                               throughput, rng);
  if (start < 0 || start + length > num_blocks) {
    return absl::InternalError(absl::StrCat(
        "ChooseSpanStart returned start ", start, " for ", length,
        " of ", num_blocks, " blocks"));
  }
  std::vector<double> before = scheduler::BlockThroughputs(others, num_blocks);
  std::vector<double> after = before;
  for (int block = start; block < start + length; ++block) {
    after[block] += throughput;
  }
  POLLEN_LOG_INFO("{} other nodes serve {}; chose blocks {}:{}, which take the "
                  "weakest block's throughput from {:.3g} to {:.3g} steps/s",
                  others.size(), model_id, start, start + length,
                  scheduler::MinBlockThroughput(before),
                  scheduler::MinBlockThroughput(after));
  v1::BlockRange range;
  range.set_start(start);
  range.set_end(start + length);
  return range;
}

}  // namespace pollen::node
