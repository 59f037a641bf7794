#include "node/throughput.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "common/status_util.h"
#include "node/block_span.h"

namespace pollen::node {
namespace {

// Format version of the cache file; files of another version are replaced.
constexpr int kCacheVersion = 1;

// Runs one forward step of `tokens` random tokens through the span's first
// block and returns its wall time in seconds.
absl::StatusOr<double> TimeStep(const BlockSpan& span,
                                std::vector<LayerKvCache>& cache,
                                int64_t position, int64_t tokens) {
  const int block = span.start();
  // [1, tokens, hidden] on the CPU, as a request delivers it.
  const at::Tensor hidden = at::randn({1, tokens, span.config().hidden_size});
  const auto started = std::chrono::steady_clock::now();
  POLLEN_ASSIGN_OR_RETURN(at::Tensor output,
                          span.Forward(hidden, cache, position, block, block + 1));
  const auto finished = std::chrono::steady_clock::now();
  (void)output;
  return std::chrono::duration<double>(finished - started).count();
}

}  // namespace

absl::StatusOr<Throughput> MeasureThroughput(const BlockSpan& span) {
  const int block = span.start();
  // Positions: 1 warm-up token, the prefill chunk, then the decode steps.
  const int64_t prefill_tokens = std::max<int64_t>(
      1, std::min<int64_t>(kMeasuredPrefillTokens,
                           span.config().max_position_embeddings - 1 -
                               kMeasuredDecodeSteps));
  const int64_t positions = 1 + prefill_tokens + kMeasuredDecodeSteps;
  std::vector<LayerKvCache> cache;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
      absl::StrCat("allocating a KV cache of ", positions,
                   " positions to measure block ", block),
      [&] {
        cache = span.AllocateCache(block, block + 1, 1, positions);
        return absl::OkStatus();
      }));

  // The first step pays for one-time setup (thread pools, kernels), so it
  // is not timed.
  POLLEN_RETURN_IF_ERROR(TimeStep(span, cache, 0, 1).status());

  POLLEN_ASSIGN_OR_RETURN(const double prefill_s,
                          TimeStep(span, cache, 1, prefill_tokens));

  std::vector<double> decode_s;
  for (int step = 0; step < kMeasuredDecodeSteps; ++step) {
    POLLEN_ASSIGN_OR_RETURN(
        const double seconds,
        TimeStep(span, cache, 1 + prefill_tokens + step, 1));
    decode_s.push_back(seconds);
  }
  std::nth_element(decode_s.begin(), decode_s.begin() + decode_s.size() / 2,
                   decode_s.end());
  const double median_s = decode_s[decode_s.size() / 2];

  // A step can take less than the clock's resolution on a tiny block.
  constexpr double kMinSeconds = 1e-9;
  Throughput throughput;
  throughput.decode_steps_per_s = 1.0 / std::max(median_s, kMinSeconds);
  throughput.prefill_tokens_per_s =
      static_cast<double>(prefill_tokens) / std::max(prefill_s, kMinSeconds);
  return throughput;
}

std::string ThroughputCacheKey(const std::string& model_id,
                               const ModelConfig& config,
                               const at::Device& device, at::ScalarType dtype,
                               Quantization quantization, int threads) {
  const std::string quantization_part =
      quantization == Quantization::kNone
          ? ""
          : absl::StrCat(" quantization=", QuantizationName(quantization));
  return absl::StrCat(model_id, " hidden=", config.hidden_size,
                      " intermediate=", config.intermediate_size,
                      " heads=", config.num_attention_heads,
                      " kv_heads=", config.num_key_value_heads,
                      " head_dim=", config.head_dim, " device=", device.str(),
                      " dtype=", DtypeName(dtype), quantization_part,
                      " threads=", threads);
}

std::string DefaultThroughputCachePath() {
  const char* xdg_cache = std::getenv("XDG_CACHE_HOME");
  if (xdg_cache != nullptr && xdg_cache[0] != '\0') {
    return absl::StrCat(xdg_cache, "/pollen/throughput.json");
  }
  const char* home = std::getenv("HOME");
  if (home != nullptr && home[0] != '\0') {
    return absl::StrCat(home, "/.cache/pollen/throughput.json");
  }
  return "";
}

namespace {

// Reads the cache file as JSON. NOT_FOUND when it does not exist,
// DATA_LOSS when it is not a cache file of kCacheVersion.
absl::StatusOr<nlohmann::json> ReadCacheFile(const std::string& path) {
  std::ifstream file(path);
  if (!file) {
    return absl::NotFoundError(
        absl::StrCat("throughput cache ", path, " does not exist"));
  }
  std::stringstream text;
  text << file.rdbuf();
  nlohmann::json cache = nlohmann::json::parse(text.str(), nullptr,
                                               /*allow_exceptions=*/false);
  if (!cache.is_object() || cache.value("version", 0) != kCacheVersion ||
      !cache.contains("entries") || !cache["entries"].is_object()) {
    return absl::DataLossError(absl::StrCat(
        "throughput cache ", path, " is not a version ", kCacheVersion,
        " cache file (a JSON object with \"version\" and \"entries\")"));
  }
  return cache;
}

}  // namespace

absl::StatusOr<Throughput> ReadCachedThroughput(const std::string& path,
                                                const std::string& key) {
  POLLEN_ASSIGN_OR_RETURN(const nlohmann::json cache, ReadCacheFile(path));
  const nlohmann::json& entries = cache["entries"];
  if (!entries.contains(key)) {
    return absl::NotFoundError(
        absl::StrCat("throughput cache ", path, " has no entry '", key, "'"));
  }
  const nlohmann::json& entry = entries[key];
  if (!entry.is_object() || !entry.contains("throughput") ||
      !entry["throughput"].is_number() ||
      !entry.contains("prefill_throughput") ||
      !entry["prefill_throughput"].is_number()) {
    return absl::DataLossError(absl::StrCat(
        "entry '", key, "' of throughput cache ", path,
        " lacks numeric \"throughput\" and \"prefill_throughput\""));
  }
  Throughput throughput;
  throughput.decode_steps_per_s = entry["throughput"].get<double>();
  throughput.prefill_tokens_per_s = entry["prefill_throughput"].get<double>();
  if (throughput.decode_steps_per_s <= 0 ||
      throughput.prefill_tokens_per_s <= 0) {
    return absl::DataLossError(absl::StrCat(
        "entry '", key, "' of throughput cache ", path,
        " holds a throughput that is not positive"));
  }
  return throughput;
}

absl::Status WriteCachedThroughput(const std::string& path,
                                   const std::string& key,
                                   const Throughput& throughput) {
  absl::StatusOr<nlohmann::json> existing = ReadCacheFile(path);
  nlohmann::json cache =
      existing.ok() ? *existing
                    : nlohmann::json{{"version", kCacheVersion},
                                     {"entries", nlohmann::json::object()}};
  cache["entries"][key] = {
      {"throughput", throughput.decode_steps_per_s},
      {"prefill_throughput", throughput.prefill_tokens_per_s},
      {"measured_at", absl::FormatTime(absl::RFC3339_sec, absl::Now(),
                                       absl::UTCTimeZone())}};

  const std::filesystem::path target(path);
  std::error_code error;
  if (target.has_parent_path()) {
    std::filesystem::create_directories(target.parent_path(), error);
    if (error) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot create the folder of throughput cache ", path,
                       ": ", error.message()));
    }
  }
  const std::string temporary = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream file(temporary, std::ios::trunc);
    file << cache.dump(2) << "\n";
    if (!file.flush()) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot write throughput cache ", temporary));
    }
  }
  std::filesystem::rename(temporary, target, error);
  if (error) {
    const std::string reason = error.message();
    std::filesystem::remove(temporary, error);
    return absl::PermissionDeniedError(absl::StrCat(
        "cannot rename ", temporary, " to ", path, ": ", reason));
  }
  return absl::OkStatus();
}

}  // namespace pollen::node
