// gRPC channels to other nodes, one per address, shared by every call to
// that address.
#pragma once

#include <map>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/tensor_codec.h"

namespace pollen {

// Largest gRPC message a client or node sends or accepts: the largest
// tensor plus room for the fields around it.
inline constexpr int kMaxMessageBytes =
    static_cast<int>(kMaxTensorBytes + (1 << 20));

// Creates and reuses one channel per node address. Channels get the message
// size limit above, keepalive pings, short reconnect backoff and a
// connection of their own. Thread-safe.
class ChannelPool {
 public:
  std::shared_ptr<grpc::Channel> Get(const std::string& address);

 private:
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace pollen
