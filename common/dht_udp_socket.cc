#include "common/dht_udp_socket.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <utility>

#include <opendht/utils.h>

#include "absl/memory/memory.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace pollen {
namespace {

// Largest UDP payload over IPv4.
constexpr size_t kMaxDatagramBytes = 65507;

// Packets read per wakeup before they are handed on, so that a long burst
// reaches OpenDHT in pieces instead of after the whole burst was read.
constexpr int kMaxPacketsPerBatch = 64;

absl::Status SocketError(int error, const std::string& action, int port) {
  return absl::UnavailableError(absl::StrCat("failed to ", action,
                                             " for the DHT on UDP port ", port,
                                             ": ", std::strerror(error)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DhtUdpSocket>> DhtUdpSocket::Open(int port) {
  const int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return SocketError(errno, "create a socket", port);

  // Ask for the larger buffer before binding, so that no packet arrives
  // while the default one is in place. A refusal only costs speed.
  const int requested = kRequestedReceiveBufferBytes;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &requested, sizeof(requested)) !=
      0) {
    POLLEN_LOG_DEBUG("DHT socket kept its default receive buffer: {}",
                     std::strerror(errno));
  }
  int granted = 0;
  socklen_t granted_length = sizeof(granted);
  getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &granted, &granted_length);

  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_ANY);
  address.sin_port = htons(static_cast<uint16_t>(port));
  if (bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) !=
      0) {
    const int error = errno;
    close(fd);
    return SocketError(error, "bind", port);
  }
  sockaddr_storage bound{};
  socklen_t bound_length = sizeof(bound);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_length) !=
      0) {
    const int error = errno;
    close(fd);
    return SocketError(error, "read the bound address", port);
  }

  int stop_pipe[2];
  if (pipe2(stop_pipe, O_CLOEXEC) != 0) {
    const int error = errno;
    close(fd);
    return SocketError(error, "create the stop pipe", port);
  }

  POLLEN_LOG_DEBUG(
      "DHT socket bound to UDP port {} with a {} byte receive "
      "buffer",
      ntohs(reinterpret_cast<const sockaddr_in&>(bound).sin_port), granted);
  return absl::WrapUnique(new DhtUdpSocket(fd, stop_pipe[0], stop_pipe[1],
                                           dht::SockAddr(bound, bound_length),
                                           granted));
}

DhtUdpSocket::DhtUdpSocket(int fd, int stop_read_fd, int stop_write_fd,
                           dht::SockAddr bound, int receive_buffer_bytes)
    : fd_(fd),
      stop_read_fd_(stop_read_fd),
      stop_write_fd_(stop_write_fd),
      bound_(std::move(bound)),
      receive_buffer_bytes_(receive_buffer_bytes),
      receive_thread_([this] { ReceiveLoop(); }) {}

DhtUdpSocket::~DhtUdpSocket() {
  stop();
  receive_thread_.join();
  close(fd_);
  close(stop_read_fd_);
  close(stop_write_fd_);
}

void DhtUdpSocket::stop() {
  if (stopping_.exchange(true)) return;
  const char wake = 1;
  // The pipe is empty until now, so this one-byte write cannot block. Should
  // it fail anyway, the loop still sees stopping_ at its next packet.
  if (write(stop_write_fd_, &wake, 1) != 1) {
    POLLEN_LOG_DEBUG("DHT socket stop signal failed: {}", std::strerror(errno));
  }
}

int DhtUdpSocket::sendTo(const dht::SockAddr& destination, const uint8_t* data,
                         size_t size, bool replied) {
  if (!destination) return EFAULT;
  if (destination.getFamily() != AF_INET) return EAFNOSUPPORT;

  // When `replied` is true, the peer has answered, and MSG_CONFIRM tells the
  // link layer that the peer is reachable (see send(2)). MSG_NOSIGNAL keeps a
  // send error from raising SIGPIPE.
  int flags = MSG_NOSIGNAL;
  if (replied) flags |= MSG_CONFIRM;
  if (sendto(fd_, data, size, flags, destination.get(),
             destination.getLength()) < 0) {
    return errno;
  }
  return 0;
}

const dht::SockAddr& DhtUdpSocket::getBoundRef(sa_family_t family) const {
  return family == AF_INET6 ? no_ipv6_ : bound_;
}

void DhtUdpSocket::ReceiveLoop() {
  pollfd fds[2] = {{fd_, POLLIN, 0}, {stop_read_fd_, POLLIN, 0}};
  while (!stopping_.load()) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      POLLEN_LOG_ERROR("DHT socket on UDP port {} stopped receiving: {}",
                       bound_.getPort(), std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;

    // Read what is queued, without blocking, in batches.
    bool drained = false;
    while (!drained && !stopping_.load()) {
      dht::net::PacketList batch;
      for (int i = 0; i < kMaxPacketsPerBatch; ++i) {
        dht::net::PacketList slot;
        {
          // DatagramSocket's packet recycling list is guarded by `lock`.
          std::lock_guard<std::mutex> guard(lock);
          slot = getNewPacket();
        }
        dht::net::ReceivedPacket& packet = slot.front();
        packet.data.resize(kMaxDatagramBytes);
        sockaddr_storage from{};
        socklen_t from_length = sizeof(from);
        const ssize_t received =
            recvfrom(fd_, packet.data.data(), packet.data.size(), MSG_DONTWAIT,
                     reinterpret_cast<sockaddr*>(&from), &from_length);
        if (received < 0) {
          if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            POLLEN_LOG_DEBUG("DHT socket receive failed: {}",
                             std::strerror(errno));
          }
          drained = true;
          break;
        }
        packet.data.resize(static_cast<size_t>(received));
        packet.from = dht::SockAddr(from, from_length);
        packet.received = dht::clock::now();
        batch.splice(batch.end(), slot);
      }
      if (!batch.empty() && !stopping_.load()) onReceived(std::move(batch));
    }
  }
}

}  // namespace pollen
