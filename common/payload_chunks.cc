#include "common/payload_chunks.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace pollen {

std::vector<v1::PayloadChunk> SplitIntoChunks(const std::string& serialized,
                                              int64_t max_chunk_bytes) {
  const size_t step = static_cast<size_t>(std::max<int64_t>(max_chunk_bytes, 1));
  std::vector<v1::PayloadChunk> chunks;
  size_t offset = 0;
  do {
    const size_t length = std::min(step, serialized.size() - offset);
    v1::PayloadChunk& chunk = chunks.emplace_back();
    chunk.set_data(serialized.substr(offset, length));
    offset += length;
    chunk.set_last(offset >= serialized.size());
  } while (offset < serialized.size());
  return chunks;
}

Reassembler::Reassembler(int64_t max_total_bytes)
    : max_total_bytes_(max_total_bytes) {}

absl::Status Reassembler::Add(const v1::PayloadChunk& chunk) {
  if (complete_) {
    return absl::FailedPreconditionError(
        "payload chunk arrived after the chunk marked last");
  }
  const int64_t total = size() + static_cast<int64_t>(chunk.data().size());
  if (total > max_total_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "payload of at least ", total, " bytes exceeds the limit of ",
        max_total_bytes_, " bytes"));
  }
  data_.append(chunk.data());
  complete_ = chunk.last();
  return absl::OkStatus();
}

absl::StatusOr<std::string> Reassembler::Take() {
  if (!complete_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "payload stream ended after ", size(),
        " bytes without a chunk marked last"));
  }
  complete_ = false;
  return std::move(data_);
}

std::vector<v1::PayloadChunk> SplitMessage(
    const google::protobuf::MessageLite& message, int64_t max_chunk_bytes) {
  return SplitIntoChunks(message.SerializeAsString(), max_chunk_bytes);
}

absl::Status ParseMessage(const std::string& serialized,
                          const std::string& what,
                          google::protobuf::MessageLite* message) {
  if (!message->ParseFromString(serialized)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "could not parse ", what, " from ", serialized.size(), " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace pollen
