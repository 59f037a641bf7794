#include "common/peer_address.h"

#include <netdb.h>
#include <sys/socket.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace pollen {

absl::StatusOr<std::pair<std::string, std::string>> SplitPeerAddress(
    const std::string& address) {
  if (!address.empty() && address.front() == '[') {
    return absl::InvalidArgumentError(
        absl::StrCat("bootstrap peer '", address,
                     "' is an IPv6 address; the DHT runs over IPv4 only"));
  }

  const size_t colon = address.rfind(':');
  const std::string host =
      colon == std::string::npos ? "" : address.substr(0, colon);
  const std::string port =
      colon == std::string::npos ? "" : address.substr(colon + 1);
  int port_number = 0;
  if (host.empty() || !absl::SimpleAtoi(port, &port_number) ||
      port_number <= 0 || port_number > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bootstrap peer '", address,
        "' is not host:port with a port in [1, 65535], e.g. 127.0.0.1:4222"));
  }
  return std::make_pair(host, port);
}

absl::Status ResolvePeerHost(const std::string& address) {
  absl::StatusOr<std::pair<std::string, std::string>> parts =
      SplitPeerAddress(address);
  if (!parts.ok()) return parts.status();

  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* addresses = nullptr;
  const int resolved =
      getaddrinfo(parts->first.c_str(), nullptr, &hints, &addresses);
  if (resolved != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bootstrap peer '", address, "': host '", parts->first,
        "' does not resolve to an IPv4 address (", gai_strerror(resolved),
        ")"));
  }
  freeaddrinfo(addresses);
  return absl::OkStatus();
}

}  // namespace pollen
