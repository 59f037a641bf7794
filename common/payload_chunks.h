// Splitting large serialized messages into PayloadChunk pieces and joining
// them again, as the Forward and Backward RPCs carry them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pollen/v1/pollen.pb.h"

namespace pollen {

// Largest `data` field the sender puts in one PayloadChunk: 4 KiB under
// 4 MiB, so that a whole chunk message stays within gRPC's default 4 MiB
// receive limit.
inline constexpr int64_t kMaxChunkBytes = (int64_t{4} << 20) - 4096;

// Largest serialized message a Reassembler accepts by default.
inline constexpr int64_t kMaxPayloadBytes = int64_t{1} << 30;

// Cuts `serialized` into chunks of at most `max_chunk_bytes` bytes each; the
// last chunk has `last` set. An empty input gives one empty chunk with
// `last` set. `max_chunk_bytes` must be positive.
std::vector<v1::PayloadChunk> SplitIntoChunks(
    const std::string& serialized, int64_t max_chunk_bytes = kMaxChunkBytes);

// Joins the chunks of one message, in order.
//
// Not thread-safe: one reader of one stream owns it.
class Reassembler {
 public:
  explicit Reassembler(int64_t max_total_bytes = kMaxPayloadBytes);

  // Appends one chunk. Returns RESOURCE_EXHAUSTED naming both sizes when the
  // total would exceed the limit, and FAILED_PRECONDITION when a chunk
  // arrives after the one marked `last`.
  absl::Status Add(const v1::PayloadChunk& chunk);

  // True once the chunk marked `last` was added.
  bool complete() const { return complete_; }

  // Bytes received so far.
  int64_t size() const { return static_cast<int64_t>(data_.size()); }

  // Moves out the whole message. INVALID_ARGUMENT when the stream ended
  // before a chunk marked `last` arrived.
  absl::StatusOr<std::string> Take();

 private:
  int64_t max_total_bytes_;
  std::string data_;
  bool complete_ = false;
};

// Serializes `message` and splits it as SplitIntoChunks does.
std::vector<v1::PayloadChunk> SplitMessage(
    const google::protobuf::MessageLite& message,
    int64_t max_chunk_bytes = kMaxChunkBytes);

// Parses the joined bytes into `message`; INVALID_ARGUMENT naming `what`
// when they are not a valid message.
absl::Status ParseMessage(const std::string& serialized,
                          const std::string& what,
                          google::protobuf::MessageLite* message);

}  // namespace pollen
