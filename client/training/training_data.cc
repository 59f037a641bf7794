#include "client/training/training_data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace pollen::client {

absl::StatusOr<std::vector<std::string>> ReadTrainingExamples(
    const std::string& path) {
  const bool jsonl = absl::EndsWith(path, ".jsonl");
  if (!jsonl && !absl::EndsWith(path, ".txt")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "training data ", path,
        " must be a .txt file (one example a line) or a .jsonl file "
        "(one {\"text\": ...} object a line)"));
  }
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("training data file ", path, " not found"));
  }

  std::vector<std::string> examples;
  std::string line;
  int line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    if (!jsonl) {
      examples.push_back(line);
      continue;
    }
    const nlohmann::json json = nlohmann::json::parse(line, nullptr,
                                                      /*allow_exceptions=*/false);
    if (json.is_discarded() || !json.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_number, ": not a JSON object; expected {\"text\": ...}"));
    }
    const auto text = json.find("text");
    if (text == json.end() || !text->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_number, ": missing string field \"text\""));
    }
    examples.push_back(text->get<std::string>());
  }
  if (examples.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("training data ", path, " holds no examples"));
  }
  return examples;
}

BatchSampler::BatchSampler(const Tokenizer& tokenizer,
                           const std::vector<std::string>& examples,
                           int batch_size, int seq_len, uint64_t seed)
    : batch_size_(batch_size), seq_len_(seq_len), seed_(seed) {
  for (const std::string& example : examples) {
    std::vector<int> ids = tokenizer.Encode(example, /*add_bos=*/true);
    if (static_cast<int>(ids.size()) > seq_len_) ids.resize(seq_len_);
    sequences_.push_back(std::move(ids));
  }
}

TokenBatch BatchSampler::Batch(int64_t step) const {
  const int64_t count = static_cast<int64_t>(sequences_.size());

  // Example i of the whole run comes from pass i / count, whose order is a
  // shuffle seeded with the seed and the pass.
  std::vector<const std::vector<int>*> chosen;
  std::vector<int64_t> order(count);
  int64_t order_pass = -1;
  for (int64_t i = step * batch_size_; i < (step + 1) * batch_size_; ++i) {
    const int64_t pass = i / count;
    if (pass != order_pass) {
      std::iota(order.begin(), order.end(), 0);
      std::mt19937_64 generator(seed_ * 1000003 + static_cast<uint64_t>(pass));
      std::shuffle(order.begin(), order.end(), generator);
      order_pass = pass;
    }
    chosen.push_back(&sequences_[order[i % count]]);
  }

  // Pad at the end to the longest sequence of the batch.
  size_t length = 0;
  for (const auto* ids : chosen) length = std::max(length, ids->size());
  TokenBatch batch;
  batch.token_ids = at::zeros({batch_size_, static_cast<int64_t>(length)},
                              at::kLong);
  batch.mask = at::zeros({batch_size_, static_cast<int64_t>(length)},
                         at::kLong);
  auto ids_accessor = batch.token_ids.accessor<int64_t, 2>();
  auto mask_accessor = batch.mask.accessor<int64_t, 2>();
  for (int b = 0; b < batch_size_; ++b) {
    const std::vector<int>& ids = *chosen[b];
    for (size_t t = 0; t < ids.size(); ++t) {
      ids_accessor[b][t] = ids[t];
      mask_accessor[b][t] = 1;
    }
    batch.num_tokens += static_cast<int64_t>(ids.size());
  }
  return batch;
}

}  // namespace pollen::client
