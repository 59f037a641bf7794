// The "host:port" addresses of DHT peers that a node or client joins
// through (--initial-peers).
#pragma once

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace pollen {

// Splits "host:port" into host and port. INVALID_ARGUMENT, quoting the
// address, when the host is empty or the port is not in [1, 65535], and
// for IPv6 literals ("[::1]:4222"), because the DHT binds IPv4 only.
absl::StatusOr<std::pair<std::string, std::string>> SplitPeerAddress(
    const std::string& address);

// Checks that the host of "host:port" resolves to an IPv4 address.
// INVALID_ARGUMENT, naming the host and the resolver's reason, when it does
// not, and SplitPeerAddress's errors for a malformed address.
absl::Status ResolvePeerHost(const std::string& address);

}  // namespace pollen
