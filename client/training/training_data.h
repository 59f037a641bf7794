// Training examples for `pollen finetune`: reading them from a file and
// packing them into token batches.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "client/tokenizer.h"

namespace pollen::client {

// Reads the examples of `path`. A .txt file contains one example per
// non-empty line, a .jsonl file one JSON object {"text": "..."} per
// non-empty line.
// Returns NOT_FOUND when the file is missing and INVALID_ARGUMENT, naming the
// file and line, for another extension, a line that is not an object with a
// string "text", or a file without examples.
absl::StatusOr<std::vector<std::string>> ReadTrainingExamples(
    const std::string& path);

// One batch: ids [batch, seq] (int64) and mask [batch, seq] (1 for a real
// token, 0 for padding at the end).
struct TokenBatch {
  at::Tensor token_ids;
  at::Tensor mask;
  int64_t num_tokens = 0;  // sum of the mask
};

// Tokenized examples (BOS first, cut to seq_len) drawn in an order shuffled
// with a seeded generator, so the same seed gives the same batches.
// Thread-compatible.
class BatchSampler {
 public:
  BatchSampler(const Tokenizer& tokenizer,
               const std::vector<std::string>& examples, int batch_size,
               int seq_len, uint64_t seed);

  // The batch of step `step` (0-based); steps past one pass over the data
  // continue with a new shuffle. Batches are independent of earlier calls,
  // so a resumed run gets the same batches as an uninterrupted one.
  TokenBatch Batch(int64_t step) const;

 private:
  std::vector<std::vector<int>> sequences_;
  int batch_size_;
  int seq_len_;
  uint64_t seed_;
};

}  // namespace pollen::client
