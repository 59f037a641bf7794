// Server-to-server push: sends a step's output straight to the session of
// the next node of a client's route, so that the hidden states skip the
// round trip through the client.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/channel_pool.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {

// Maximum time a push may take before it counts as failed. The receiving
// node replies once it has queued the step, so this bounds a network hop,
// not a forward pass.
inline constexpr absl::Duration kPushTimeout = absl::Seconds(5);

// Maximum length of the host:port a client may name as a push target.
inline constexpr size_t kMaxPushAddressLength = 255;

// Checks a client's push target before any work: a host:port address of at
// most kMaxPushAddressLength characters and a session id of 1 to
// `max_session_id_length` characters.
absl::Status ValidatePushTarget(const v1::PushTarget& target,
                                size_t max_session_id_length);

// Makes Push calls to other nodes over pooled channels, without blocking
// the caller. Thread-safe.
//
// NOTE: the addresses come from the client and are not checked against
// the DHT records, so a client can make this node dial any host:port, and
// the channel to each address stays pooled while the node runs.
class StepPusher {
 public:
  StepPusher() = default;
  StepPusher(const StepPusher&) = delete;
  StepPusher& operator=(const StepPusher&) = delete;

  // Sends `request` to the node at `address` and calls `done` once, from a
  // gRPC thread, with OK when that node queued the step, or the reason it
  // did not (its status, or DEADLINE_EXCEEDED after kPushTimeout).
  void Push(const std::string& address,
            std::unique_ptr<v1::PushRequest> request,
            std::function<void(absl::Status)> done);

 private:
  ChannelPool channels_;
};

}  // namespace pollen::node
