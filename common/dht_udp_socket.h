// The UDP socket under a DhtRegistry's OpenDHT runner.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>

#include <opendht/network_utils.h>
#include <opendht/sockaddr.h>

#include "absl/status/statusor.h"

namespace pollen {

// An IPv4 UDP socket for OpenDHT with a larger receive buffer than
// OpenDHT's own net::UdpSocket, which keeps the system default
// (net.core.rmem_default, usually 208 KiB). A lookup sends requests to
// several peers at once, so the replies of parallel lookups and puts arrive
// in bursts. When a burst finds the buffer full, for instance while the
// receive thread waits for a busy CPU, the kernel drops replies and OpenDHT
// resends them only after a second.
//
// Thread contract, as OpenDHT expects: sendTo() may be called from any
// thread, and one internal thread receives and hands packets to the callback
// set with setOnReceive().
class DhtUdpSocket final : public dht::net::DatagramSocket {
 public:
  // Receive buffer size requested from the kernel, which caps it at
  // net.core.rmem_max. With 4 MiB granted, eight loopback nodes that each
  // announced and fetched 80 blocks showed no receive buffer drops.
  static constexpr int kRequestedReceiveBufferBytes = 4 << 20;

  // Binds 0.0.0.0:`port` (0 picks a free port) and starts receiving.
  // UNAVAILABLE when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<DhtUdpSocket>> Open(int port);

  // Stops and joins the receive thread.
  ~DhtUdpSocket() override;

  DhtUdpSocket(const DhtUdpSocket&) = delete;
  DhtUdpSocket& operator=(const DhtUdpSocket&) = delete;

  // Returns 0 or the errno of the failed send.
  int sendTo(const dht::SockAddr& destination, const uint8_t* data, size_t size,
             bool replied) override;

  bool hasIPv4() const override { return true; }
  bool hasIPv6() const override { return false; }

  const dht::SockAddr& getBoundRef(
      sa_family_t family = AF_UNSPEC) const override;

  // Stops receiving. A batch already being handed on completes, and no later
  // one is handed on.
  void stop() override;

  // Receive buffer size the kernel granted, in bytes.
  int receive_buffer_bytes() const { return receive_buffer_bytes_; }

 private:
  DhtUdpSocket(int fd, int stop_read_fd, int stop_write_fd, dht::SockAddr bound,
               int receive_buffer_bytes);

  // Waits for packets and hands each batch of queued ones to OpenDHT.
  void ReceiveLoop();

  // Set once in Open.
  const int fd_;
  const int stop_read_fd_;   // read end of the pipe that wakes ReceiveLoop
  const int stop_write_fd_;  // write end, written once by stop()
  const dht::SockAddr bound_;
  const dht::SockAddr no_ipv6_;
  const int receive_buffer_bytes_;

  std::atomic<bool> stopping_{false};
  std::thread receive_thread_;
};

}  // namespace pollen
