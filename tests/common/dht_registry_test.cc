// Identities and the DHT registry, on a real OpenDHT swarm over loopback UDP:
// several DhtRegistry instances in this process, bootstrapped to the first.
#include "common/dht_registry.h"

#include <sys/stat.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <opendht/crypto.h>
#include <opendht/value.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/dht_udp_socket.h"
#include "common/identity.h"
#include "tests/support/test_support.h"

namespace pollen {
namespace {

using pollen::v1::NodeRecord;
using pollen::v1::NodeState;

constexpr absl::Duration kTimeout = absl::Seconds(5);
constexpr char kModel[] = "m";

dht::crypto::Identity NewIdentity(const std::string& name) {
  absl::StatusOr<dht::crypto::Identity> identity =
      CreateEphemeralIdentity(name);
  EXPECT_TRUE(identity.ok()) << identity.status();
  return identity.ok() ? *identity : dht::crypto::Identity{};
}

NodeRecord MakeRecord(const std::string& node_id, const std::string& model,
                      uint32_t start, uint32_t end,
                      absl::Duration expires_in = absl::Seconds(90)) {
  NodeRecord record;
  record.set_model_id(model);
  record.mutable_blocks()->set_start(start);
  record.mutable_blocks()->set_end(end);
  record.set_node_id(node_id);
  record.set_address(absl::StrCat("127.0.0.1:", 50000 + start));
  record.set_public_name(absl::StrCat("node-", start));
  record.set_state(pollen::v1::NODE_STATE_ONLINE);
  record.set_throughput(10.0);
  record.set_cache_tokens_left(4096);
  const absl::Time now = absl::Now();
  record.set_announced_ms(absl::ToUnixMillis(now));
  record.set_expires_ms(absl::ToUnixMillis(now + expires_in));
  record.set_version("test");
  record.set_num_blocks(5);
  return record;
}

// A value carrying `record`, signed by `signer` unless it is empty.
std::shared_ptr<dht::Value> MakeValue(const NodeRecord& record,
                                      const dht::crypto::Identity& signer) {
  const std::string payload = record.SerializeAsString();
  auto value = std::make_shared<dht::Value>(
      kNodeRecordValueType, dht::Blob(payload.begin(), payload.end()), 7);
  if (signer.first) value->sign(*signer.first);
  return value;
}

bool IsHex(const std::string& text) {
  return text.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// ---------------------------------------------------------------------------
// Identities.

TEST(IdentityTest, SaveAndReload) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/keys/node";

  absl::StatusOr<dht::crypto::Identity> created =
      LoadOrCreateIdentity(path, "node-a");
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_TRUE(std::filesystem::exists(path + ".pem"));
  EXPECT_TRUE(std::filesystem::exists(path + ".crt"));

  absl::StatusOr<dht::crypto::Identity> loaded =
      LoadOrCreateIdentity(path, "ignored");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(NodeIdOf(*loaded), NodeIdOf(*created));
}

TEST(IdentityTest, KeyFileOwnerOnly) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/node";
  ASSERT_TRUE(LoadOrCreateIdentity(path, "node-a").ok());

  struct stat info {};
  ASSERT_EQ(stat((path + ".pem").c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0600);
}

TEST(IdentityTest, ReadsOpenDhtLayout) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/saved";
  const dht::crypto::Identity original = NewIdentity("saved");
  dht::crypto::saveIdentity(original, path);

  absl::StatusOr<dht::crypto::Identity> loaded =
      LoadOrCreateIdentity(path, "ignored");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(NodeIdOf(*loaded), NodeIdOf(original));
}

TEST(IdentityTest, CorruptKeyFile) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/node";
  ASSERT_TRUE(LoadOrCreateIdentity(path, "node-a").ok());
  std::ofstream(path + ".pem", std::ios::trunc) << "not a key";

  absl::StatusOr<dht::crypto::Identity> loaded =
      LoadOrCreateIdentity(path, "node-a");
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(absl::StrContains(loaded.status().message(), path + ".pem"))
      << loaded.status();
}

TEST(IdentityTest, CorruptCertificateFile) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/node";
  ASSERT_TRUE(LoadOrCreateIdentity(path, "node-a").ok());
  std::ofstream(path + ".crt", std::ios::trunc) << "not a certificate";

  absl::StatusOr<dht::crypto::Identity> loaded =
      LoadOrCreateIdentity(path, "node-a");
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(absl::StrContains(loaded.status().message(), path + ".crt"))
      << loaded.status();
}

TEST(IdentityTest, MissingCertificate) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/node";
  ASSERT_TRUE(LoadOrCreateIdentity(path, "node-a").ok());
  std::filesystem::remove(path + ".crt");

  absl::StatusOr<dht::crypto::Identity> loaded =
      LoadOrCreateIdentity(path, "node-a");
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(loaded.status().message(), path + ".crt"))
      << loaded.status();
}

TEST(IdentityTest, MismatchedCertificate) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/node";
  const std::string other = dir.path() + "/other";
  ASSERT_TRUE(LoadOrCreateIdentity(path, "node-a").ok());
  ASSERT_TRUE(LoadOrCreateIdentity(other, "node-b").ok());
  std::filesystem::copy_file(other + ".crt", path + ".crt",
                             std::filesystem::copy_options::overwrite_existing);

  absl::StatusOr<dht::crypto::Identity> loaded =
      LoadOrCreateIdentity(path, "node-a");
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
}

TEST(IdentityTest, EmptyPath) {
  EXPECT_EQ(LoadOrCreateIdentity("", "node").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(IdentityTest, NodeIdIsHexKeyId) {
  const dht::crypto::Identity identity = NewIdentity("node");
  const std::string node_id = NodeIdOf(identity);
  EXPECT_EQ(node_id.size(), 40u);
  EXPECT_TRUE(IsHex(node_id)) << node_id;
  EXPECT_EQ(node_id, identity.second->getId().toString());
  EXPECT_EQ(NodeIdOf(dht::crypto::Identity{}), "");
}

TEST(IdentityTest, EphemeralDiffer) {
  EXPECT_NE(NodeIdOf(NewIdentity("a")), NodeIdOf(NewIdentity("b")));
}

// ---------------------------------------------------------------------------
// Keys and record checks, without a network.

TEST(DhtKeyTest, Format) {
  EXPECT_EQ(BlockKey("meta-llama/Llama-2-7b-hf", 3),
            "pollen/v1/meta-llama/Llama-2-7b-hf/block/3");
  EXPECT_EQ(ModelIndexKey(), "pollen/v1/models");
}

class ParseRecordValueTest : public ::testing::Test {
 protected:
  ParseRecordValueTest()
      : identity_(NewIdentity("a")),
        record_(MakeRecord(NodeIdOf(identity_), kModel, 0, 2)) {}

  dht::crypto::Identity identity_;
  NodeRecord record_;
};

TEST_F(ParseRecordValueTest, AcceptsSigned) {
  absl::StatusOr<NodeRecord> parsed =
      ParseRecordValue(*MakeValue(record_, identity_), absl::Now());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->node_id(), record_.node_id());
  EXPECT_EQ(parsed->address(), record_.address());
  EXPECT_EQ(parsed->blocks().end(), 2u);
}

TEST_F(ParseRecordValueTest, RejectsUnsigned) {
  absl::StatusOr<NodeRecord> parsed =
      ParseRecordValue(*MakeValue(record_, {}), absl::Now());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(ParseRecordValueTest, RejectsTamperedPayload) {
  std::shared_ptr<dht::Value> value = MakeValue(record_, identity_);
  NodeRecord tampered = record_;
  tampered.set_address("203.0.113.9:1");
  const std::string payload = tampered.SerializeAsString();
  value->data.assign(payload.begin(), payload.end());

  absl::StatusOr<NodeRecord> parsed = ParseRecordValue(*value, absl::Now());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(ParseRecordValueTest, RejectsExpired) {
  const NodeRecord expired =
      MakeRecord(NodeIdOf(identity_), kModel, 0, 2, -absl::Seconds(1));
  absl::StatusOr<NodeRecord> parsed =
      ParseRecordValue(*MakeValue(expired, identity_), absl::Now());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(ParseRecordValueTest, ExpiryFollowsNow) {
  const std::shared_ptr<dht::Value> value = MakeValue(record_, identity_);
  const absl::Time expiry = absl::FromUnixMillis(record_.expires_ms());
  EXPECT_TRUE(ParseRecordValue(*value, expiry - absl::Milliseconds(1)).ok());
  EXPECT_FALSE(ParseRecordValue(*value, expiry).ok());
}

TEST_F(ParseRecordValueTest, RejectsForgedNodeId) {
  const dht::crypto::Identity forger = NewIdentity("b");
  absl::StatusOr<NodeRecord> parsed =
      ParseRecordValue(*MakeValue(record_, forger), absl::Now());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(ParseRecordValueTest, RejectsGarbagePayload) {
  auto value = std::make_shared<dht::Value>(
      kNodeRecordValueType, dht::Blob{0xff, 0xff, 0xff, 0xff}, 7);
  value->sign(*identity_.first);
  EXPECT_EQ(ParseRecordValue(*value, absl::Now()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ParseRecordValueTest, RejectsEmptySpan) {
  NodeRecord empty = record_;
  empty.mutable_blocks()->set_start(2);
  EXPECT_EQ(ParseRecordValue(*MakeValue(empty, identity_), absl::Now())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ParseRecordValueTest, RejectsOtherType) {
  std::shared_ptr<dht::Value> value = MakeValue(record_, {});
  value->type = 0;
  value->sign(*identity_.first);
  EXPECT_EQ(ParseRecordValue(*value, absl::Now()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// The registry's UDP socket.

dht::SockAddr LoopbackAddress(sa_family_t family, int port) {
  dht::SockAddr address;
  address.setFamily(family);
  address.setAddress(family == AF_INET ? "127.0.0.1" : "::1");
  address.setPort(static_cast<in_port_t>(port));
  return address;
}

TEST(DhtUdpSocketTest, BindsFreePort) {
  absl::StatusOr<std::unique_ptr<DhtUdpSocket>> socket = DhtUdpSocket::Open(0);
  ASSERT_TRUE(socket.ok()) << socket.status();
  EXPECT_GT((*socket)->getPort(AF_INET), 0);
  EXPECT_TRUE((*socket)->hasIPv4());
  EXPECT_FALSE((*socket)->hasIPv6());
  EXPECT_GT((*socket)->receive_buffer_bytes(), 0);
}

TEST(DhtUdpSocketTest, SendsAndReceives) {
  // Declared before the sockets, so that they outlive the receive thread.
  absl::Mutex mu;
  std::vector<std::pair<std::string, int>> received;  // payload, source port

  absl::StatusOr<std::unique_ptr<DhtUdpSocket>> sender = DhtUdpSocket::Open(0);
  absl::StatusOr<std::unique_ptr<DhtUdpSocket>> receiver =
      DhtUdpSocket::Open(0);
  ASSERT_TRUE(sender.ok()) << sender.status();
  ASSERT_TRUE(receiver.ok()) << receiver.status();

  (*receiver)->setOnReceive([&](dht::net::PacketList&& packets) {
    absl::MutexLock lock(&mu);
    for (const dht::net::ReceivedPacket& packet : packets) {
      received.emplace_back(std::string(packet.data.begin(), packet.data.end()),
                            packet.from.getPort());
    }
    return std::move(packets);
  });

  const dht::SockAddr destination =
      LoopbackAddress(AF_INET, (*receiver)->getPort(AF_INET));
  for (const std::string payload : {"first", "second"}) {
    EXPECT_EQ((*sender)->sendTo(
                  destination, reinterpret_cast<const uint8_t*>(payload.data()),
                  payload.size(), false),
              0);
  }

  absl::MutexLock lock(&mu);
  auto both_arrived = [&received]() { return received.size() == 2; };
  ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(&both_arrived), kTimeout));
  EXPECT_EQ(received[0].first, "first");
  EXPECT_EQ(received[1].first, "second");
  EXPECT_EQ(received[0].second, (*sender)->getPort(AF_INET));
}

TEST(DhtUdpSocketTest, PortInUse) {
  absl::StatusOr<std::unique_ptr<DhtUdpSocket>> first = DhtUdpSocket::Open(0);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<std::unique_ptr<DhtUdpSocket>> second =
      DhtUdpSocket::Open((*first)->getPort(AF_INET));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

TEST(DhtUdpSocketTest, RejectsIpv6Destination) {
  absl::StatusOr<std::unique_ptr<DhtUdpSocket>> socket = DhtUdpSocket::Open(0);
  ASSERT_TRUE(socket.ok()) << socket.status();
  const uint8_t byte = 0;
  EXPECT_EQ((*socket)->sendTo(LoopbackAddress(AF_INET6, 4222), &byte, 1, false),
            EAFNOSUPPORT);
}

// ---------------------------------------------------------------------------
// Registries on loopback.

std::unique_ptr<DhtRegistry> StartRegistry(
    const dht::crypto::Identity& identity, int bootstrap_port) {
  DhtOptions options;
  options.identity = identity;
  if (bootstrap_port > 0) {
    options.bootstrap.push_back(absl::StrCat("127.0.0.1:", bootstrap_port));
  }
  absl::StatusOr<std::unique_ptr<DhtRegistry>> registry =
      DhtRegistry::Start(options);
  EXPECT_TRUE(registry.ok()) << registry.status();
  if (!registry.ok()) return nullptr;
  if (bootstrap_port > 0) {
    const absl::Status connected = (*registry)->WaitConnected(kTimeout);
    EXPECT_TRUE(connected.ok()) << connected;
  }
  return *std::move(registry);
}

TEST(DhtRegistryTest, NewSwarmStarts) {
  std::unique_ptr<DhtRegistry> registry =
      StartRegistry(NewIdentity("first"), 0);
  ASSERT_NE(registry, nullptr);
  EXPECT_GT(registry->port(), 0);
  EXPECT_EQ(registry->node_id().size(), 40u);
  EXPECT_TRUE(registry->WaitConnected(absl::ZeroDuration()).ok());
}

TEST(DhtRegistryTest, ReadOnlyHasNoNodeId) {
  std::unique_ptr<DhtRegistry> registry = StartRegistry({}, 0);
  ASSERT_NE(registry, nullptr);
  EXPECT_EQ(registry->node_id(), "");

  const absl::Status announced =
      registry->Announce(MakeRecord("", kModel, 0, 1), kTimeout);
  EXPECT_EQ(announced.code(), absl::StatusCode::kFailedPrecondition);
}

TEST(DhtRegistryTest, BadBootstrapAddress) {
  for (const char* address :
       {"127.0.0.1", "127.0.0.1:0", ":4222", "127.0.0.1:port",
        "127.0.0.1:70000", "[::1]:4222"}) {
    DhtOptions options;
    options.bootstrap.push_back(address);
    EXPECT_EQ(DhtRegistry::Start(options).status().code(),
              absl::StatusCode::kInvalidArgument)
        << address;
  }
}

TEST(DhtRegistryTest, PortInUse) {
  std::unique_ptr<DhtRegistry> first = StartRegistry({}, 0);
  ASSERT_NE(first, nullptr);

  DhtOptions options;
  options.port = first->port();
  absl::StatusOr<std::unique_ptr<DhtRegistry>> second =
      DhtRegistry::Start(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

TEST(DhtRegistryTest, FixedPort) {
  const int port = testing::FreePort();
  DhtOptions options;
  options.port = port;
  absl::StatusOr<std::unique_ptr<DhtRegistry>> registry =
      DhtRegistry::Start(options);
  ASSERT_TRUE(registry.ok()) << registry.status();
  EXPECT_EQ((*registry)->port(), port);
}

TEST(DhtRegistryTest, NoPeerTimesOut) {
  // Nothing listens on this UDP port, so the bootstrap ping goes unanswered.
  const int silent_port = testing::FreePort();
  DhtOptions options;
  options.bootstrap.push_back(absl::StrCat("127.0.0.1:", silent_port));
  absl::StatusOr<std::unique_ptr<DhtRegistry>> registry =
      DhtRegistry::Start(options);
  ASSERT_TRUE(registry.ok()) << registry.status();

  const absl::Status connected =
      (*registry)->WaitConnected(absl::Milliseconds(300));
  EXPECT_EQ(connected.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(connected.message(),
                                absl::StrCat("127.0.0.1:", silent_port)))
      << connected;
}

TEST(DhtRegistryTest, FetchWithoutPeerTimesOut) {
  const int silent_port = testing::FreePort();
  DhtOptions options;
  options.bootstrap.push_back(absl::StrCat("127.0.0.1:", silent_port));
  absl::StatusOr<std::unique_ptr<DhtRegistry>> registry =
      DhtRegistry::Start(options);
  ASSERT_TRUE(registry.ok()) << registry.status();

  absl::StatusOr<std::vector<NodeRecord>> found =
      (*registry)->FetchSpan(kModel, 0, 5, absl::Milliseconds(300));
  EXPECT_EQ(found.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(found.status().message(),
                                absl::StrCat("127.0.0.1:", silent_port)))
      << found.status();
}

TEST(DhtRegistryTest, AnnounceChecksNodeId) {
  std::unique_ptr<DhtRegistry> registry = StartRegistry(NewIdentity("a"), 0);
  ASSERT_NE(registry, nullptr);
  const absl::Status announced = registry->Announce(
      MakeRecord(NodeIdOf(NewIdentity("b")), kModel, 0, 1), kTimeout);
  EXPECT_EQ(announced.code(), absl::StatusCode::kInvalidArgument);
}

TEST(DhtRegistryTest, AnnounceChecksSpan) {
  std::unique_ptr<DhtRegistry> registry = StartRegistry(NewIdentity("a"), 0);
  ASSERT_NE(registry, nullptr);
  const absl::Status announced = registry->Announce(
      MakeRecord(registry->node_id(), kModel, 3, 3), kTimeout);
  EXPECT_EQ(announced.code(), absl::StatusCode::kInvalidArgument);
}

TEST(DhtRegistryTest, FetchChecksArguments) {
  std::unique_ptr<DhtRegistry> registry = StartRegistry({}, 0);
  ASSERT_NE(registry, nullptr);
  EXPECT_EQ(registry->FetchSpan(kModel, 2, 2, kTimeout).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry->FetchSpan(kModel, -1, 2, kTimeout).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry->FetchBlock("", 0, kTimeout).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DhtRegistryTest, LoneNodeAnnounces) {
  std::unique_ptr<DhtRegistry> registry = StartRegistry(NewIdentity("a"), 0);
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(
      registry
          ->Announce(MakeRecord(registry->node_id(), kModel, 0, 5), kTimeout)
          .ok());

  // The values stay in the node's own storage until peers join.
  absl::StatusOr<std::vector<NodeRecord>> found =
      registry->FetchBlock(kModel, 4, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->size(), 1u);
}

// Three nodes serving blocks [0, 2), [2, 4) and [4, 5) of model "m", and a
// read-only client, all bootstrapped to the first node.
class SwarmTest : public ::testing::Test {
 protected:
  static constexpr int kNodes = 3;
  static constexpr uint32_t kSpans[kNodes][2] = {{0, 2}, {2, 4}, {4, 5}};

  void SetUp() override {
    for (int i = 0; i < kNodes; ++i) {
      identities_.push_back(NewIdentity(absl::StrCat("node-", i)));
      nodes_.push_back(StartRegistry(identities_.back(),
                                     i == 0 ? 0 : nodes_.front()->port()));
      ASSERT_NE(nodes_.back(), nullptr);
    }
    client_ = StartRegistry({}, nodes_.front()->port());
    ASSERT_NE(client_, nullptr);

    for (int i = 0; i < kNodes; ++i) {
      records_.push_back(
          MakeRecord(nodes_[i]->node_id(), kModel, kSpans[i][0], kSpans[i][1]));
      const absl::Status announced = nodes_[i]->Announce(records_[i], kTimeout);
      ASSERT_TRUE(announced.ok()) << announced;
    }
  }

  // Records of `node_id` among `records`.
  static std::vector<NodeRecord> RecordsOf(
      const std::vector<NodeRecord>& records, const std::string& node_id) {
    std::vector<NodeRecord> found;
    for (const NodeRecord& record : records) {
      if (record.node_id() == node_id) found.push_back(record);
    }
    return found;
  }

  std::vector<dht::crypto::Identity> identities_;
  std::vector<std::unique_ptr<DhtRegistry>> nodes_;
  std::unique_ptr<DhtRegistry> client_;
  std::vector<NodeRecord> records_;
};

TEST_F(SwarmTest, FetchSpanFindsAll) {
  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchSpan(kModel, 0, 5, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 3u);
  for (int i = 0; i < kNodes; ++i) {
    const NodeRecord& record = (*found)[i];
    EXPECT_EQ(record.node_id(), nodes_[i]->node_id()) << i;
    EXPECT_EQ(record.blocks().start(), kSpans[i][0]) << i;
    EXPECT_EQ(record.blocks().end(), kSpans[i][1]) << i;
    EXPECT_EQ(record.address(), records_[i].address()) << i;
    EXPECT_EQ(record.state(), pollen::v1::NODE_STATE_ONLINE) << i;
  }
}

TEST_F(SwarmTest, FetchBlockFindsOwner) {
  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 3, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].node_id(), nodes_[1]->node_id());
  EXPECT_EQ((*found)[0].blocks().start(), 2u);
  EXPECT_EQ((*found)[0].blocks().end(), 4u);
}

TEST_F(SwarmTest, FindBlockServerMatchesAddress) {
  EXPECT_TRUE(
      client_->FindBlockServer(kModel, 3, records_[1].address(), kTimeout).ok());
  EXPECT_TRUE(
      client_->FindBlockServer(kModel, 2, records_[1].address(), kTimeout).ok());
}

TEST_F(SwarmTest, FindBlockServerRejectsOthers) {
  // Node 0 serves blocks 0:2, not block 3.
  EXPECT_EQ(
      client_->FindBlockServer(kModel, 3, records_[0].address(), kTimeout)
          .code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->FindBlockServer(kModel, 3, "127.0.0.1:1", kTimeout).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(
      client_->FindBlockServer("other", 3, records_[1].address(), kTimeout)
          .code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(
      client_->FindBlockServer(kModel, -1, records_[1].address(), kTimeout)
          .code(),
      absl::StatusCode::kInvalidArgument);
}

TEST_F(SwarmTest, FindBlockServerSkipsOffline) {
  NodeRecord offline = records_[2];
  offline.set_state(pollen::v1::NODE_STATE_OFFLINE);
  offline.set_announced_ms(offline.announced_ms() + 1);
  ASSERT_TRUE(nodes_[2]->Announce(offline, kTimeout).ok());

  EXPECT_EQ(
      client_->FindBlockServer(kModel, 4, records_[2].address(), kTimeout)
          .code(),
      absl::StatusCode::kNotFound);
}

TEST_F(SwarmTest, FetchFromEveryNode) {
  for (int i = 0; i < kNodes; ++i) {
    absl::StatusOr<std::vector<NodeRecord>> found =
        nodes_[i]->FetchSpan(kModel, 0, 5, kTimeout);
    ASSERT_TRUE(found.ok()) << found.status();
    EXPECT_EQ(found->size(), 3u) << "fetched by node " << i;
  }
}

TEST_F(SwarmTest, UnknownModelIsEmpty) {
  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchSpan("other", 0, 5, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_TRUE(found->empty());
}

TEST_F(SwarmTest, ModelIndexListsModel) {
  absl::StatusOr<std::vector<NodeRecord>> index =
      client_->FetchModelIndex(kTimeout);
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_EQ(index->size(), 3u);
  for (const NodeRecord& record : *index) {
    EXPECT_EQ(record.model_id(), kModel);
    EXPECT_EQ(record.num_blocks(), 5u);
  }
}

TEST_F(SwarmTest, ModelIndexListsEachModel) {
  NodeRecord other = MakeRecord(nodes_[0]->node_id(), "other", 0, 1);
  ASSERT_TRUE(nodes_[0]->Announce(other, kTimeout).ok());

  absl::StatusOr<std::vector<NodeRecord>> index =
      client_->FetchModelIndex(kTimeout);
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_EQ(index->size(), 4u);
  EXPECT_EQ(RecordsOf(*index, nodes_[0]->node_id()).size(), 2u);
}

TEST_F(SwarmTest, ReannounceReplaces) {
  // A first fetch leaves OpenDHT searches for these keys on the client, so
  // the fetches below also show that their results are not served stale.
  ASSERT_TRUE(client_->FetchSpan(kModel, 0, 5, kTimeout).ok());

  // The update claims an older announced_ms than the first record, so a
  // fetch that found both and kept the newer one would return the old
  // fields. Only replacement in the peers' storage returns the update.
  NodeRecord updated = records_[1];
  updated.set_throughput(99.5);
  updated.set_cache_tokens_left(17);
  updated.set_announced_ms(updated.announced_ms() - 1000);
  ASSERT_TRUE(nodes_[1]->Announce(updated, kTimeout).ok());

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchSpan(kModel, 0, 5, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->size(), 3u);
  const std::vector<NodeRecord> mine = RecordsOf(*found, nodes_[1]->node_id());
  ASSERT_EQ(mine.size(), 1u);
  EXPECT_EQ(mine[0].throughput(), 99.5);
  EXPECT_EQ(mine[0].cache_tokens_left(), 17u);

  // Peers store one value per node and key, not the old one beside the new.
  absl::StatusOr<std::vector<NodeRecord>> block =
      client_->FetchBlock(kModel, 2, kTimeout);
  ASSERT_TRUE(block.ok()) << block.status();
  ASSERT_EQ(block->size(), 1u);
  EXPECT_EQ((*block)[0].cache_tokens_left(), 17u);
  EXPECT_EQ(client_->rejected_value_count(), 0u);
}

TEST_F(SwarmTest, ShrunkSpanLeavesBlock) {
  NodeRecord shrunk = records_[0];
  shrunk.mutable_blocks()->set_end(1);
  shrunk.set_announced_ms(shrunk.announced_ms() + 1);
  ASSERT_TRUE(nodes_[0]->Announce(shrunk, kTimeout).ok());

  absl::StatusOr<std::vector<NodeRecord>> block1 =
      client_->FetchBlock(kModel, 1, kTimeout);
  ASSERT_TRUE(block1.ok()) << block1.status();
  EXPECT_TRUE(block1->empty());

  absl::StatusOr<std::vector<NodeRecord>> block0 =
      client_->FetchBlock(kModel, 0, kTimeout);
  ASSERT_TRUE(block0.ok()) << block0.status();
  ASSERT_EQ(block0->size(), 1u);
  EXPECT_EQ((*block0)[0].blocks().end(), 1u);
}

TEST_F(SwarmTest, OfflineWithdraws) {
  NodeRecord offline = records_[2];
  offline.set_state(pollen::v1::NODE_STATE_OFFLINE);
  offline.set_announced_ms(offline.announced_ms() + 1);
  ASSERT_TRUE(nodes_[2]->Announce(offline, kTimeout).ok());

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 4, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].state(), pollen::v1::NODE_STATE_OFFLINE);
}

TEST_F(SwarmTest, OfflineSurvivesShutdown) {
  NodeRecord offline = records_[2];
  offline.set_state(pollen::v1::NODE_STATE_OFFLINE);
  offline.set_announced_ms(offline.announced_ms() + 1);
  ASSERT_TRUE(nodes_[2]->Announce(offline, kTimeout).ok());
  nodes_[2].reset();

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 4, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].state(), pollen::v1::NODE_STATE_OFFLINE);
}

TEST_F(SwarmTest, RecordExpires) {
  NodeRecord short_lived =
      MakeRecord(nodes_[0]->node_id(), "brief", 0, 1, absl::Seconds(2));
  ASSERT_TRUE(nodes_[0]->Announce(short_lived, kTimeout).ok());

  absl::StatusOr<std::vector<NodeRecord>> before =
      client_->FetchSpan("brief", 0, 1, kTimeout);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(before->size(), 1u);

  absl::SleepFor(absl::FromUnixMillis(short_lived.expires_ms()) - absl::Now() +
                 absl::Milliseconds(100));
  absl::StatusOr<std::vector<NodeRecord>> after =
      client_->FetchSpan("brief", 0, 1, kTimeout);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(after->empty());
}

TEST_F(SwarmTest, UnsignedValueIgnored) {
  // Claims to be node 1, unsigned, under a block key of node 0's span.
  const NodeRecord claim = MakeRecord(nodes_[1]->node_id(), kModel, 0, 2);
  ASSERT_TRUE(nodes_[1]
                  ->PutValueForTesting(BlockKey(kModel, 1),
                                       MakeValue(claim, {}), kTimeout)
                  .ok());

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 1, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].node_id(), nodes_[0]->node_id());
  EXPECT_GE(client_->rejected_value_count(), 1u);
}

TEST_F(SwarmTest, ForgedNodeIdIgnored) {
  // Node 2 signs a record that claims node 0's id and points at another
  // address.
  NodeRecord forged = records_[0];
  forged.set_address("127.0.0.1:1");
  forged.set_announced_ms(forged.announced_ms() + 1000);
  ASSERT_TRUE(nodes_[2]
                  ->PutValueForTesting(BlockKey(kModel, 0),
                                       MakeValue(forged, identities_[2]),
                                       kTimeout)
                  .ok());

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 0, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].address(), records_[0].address());
  EXPECT_GE(client_->rejected_value_count(), 1u);
}

TEST_F(SwarmTest, OtherModelIgnored) {
  // A valid record of node 2 for another model, copied under block 0 of "m".
  const NodeRecord other = MakeRecord(nodes_[2]->node_id(), "other", 0, 2);
  ASSERT_TRUE(nodes_[2]
                  ->PutValueForTesting(BlockKey(kModel, 0),
                                       MakeValue(other, identities_[2]),
                                       kTimeout)
                  .ok());

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 0, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].node_id(), nodes_[0]->node_id());
  EXPECT_GE(client_->rejected_value_count(), 1u);
}

TEST_F(SwarmTest, BlockOutsideSpanIgnored) {
  // Node 2's own valid record for blocks [4, 5), copied under block 0.
  ASSERT_TRUE(nodes_[2]
                  ->PutValueForTesting(BlockKey(kModel, 0),
                                       MakeValue(records_[2], identities_[2]),
                                       kTimeout)
                  .ok());

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 0, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].node_id(), nodes_[0]->node_id());
}

// A record with `entries` next_rtt_ms entries, with node ids of 40 hex digits.
NodeRecord WithRtts(NodeRecord record, int entries) {
  for (int i = 0; i < entries; ++i) {
    (*record.mutable_next_rtt_ms())[absl::StrCat(
        std::string(24, '0'), absl::Hex(i, absl::kZeroPad16))] = 1.5 + i;
  }
  return record;
}

TEST_F(SwarmTest, LargeRecordRoundTrips) {
  // About 11 KB, far above the few hundred bytes of a typical record.
  const NodeRecord large = WithRtts(records_[1], 200);
  ASSERT_GT(large.ByteSizeLong(), 10000u);
  const absl::Status announced = nodes_[1]->Announce(large, kTimeout);
  ASSERT_TRUE(announced.ok()) << announced;

  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 2, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].next_rtt_ms_size(), 200);
}

TEST_F(SwarmTest, OversizedRecordRejected) {
  const NodeRecord oversized = WithRtts(records_[1], 400);
  ASSERT_GT(oversized.ByteSizeLong(), kMaxRecordBytes);
  EXPECT_EQ(nodes_[1]->Announce(oversized, kTimeout).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SwarmTest, RestartedNodeReplaces) {
  nodes_[1].reset();
  nodes_[1] = StartRegistry(identities_[1], nodes_[0]->port());
  ASSERT_NE(nodes_[1], nullptr);
  NodeRecord restarted = MakeRecord(nodes_[1]->node_id(), kModel, 2, 4);
  restarted.set_address("127.0.0.1:60001");
  ASSERT_TRUE(nodes_[1]->Announce(restarted, kTimeout).ok());

  // The old process's values stay in storage until they expire, so the fetch
  // finds both and keeps the newer record.
  absl::StatusOr<std::vector<NodeRecord>> found =
      client_->FetchBlock(kModel, 2, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_EQ(found->size(), 1u);
  EXPECT_EQ((*found)[0].address(), "127.0.0.1:60001");
}

TEST_F(SwarmTest, FetchRightAfterStart) {
  // No WaitConnected: the fetch waits for the bootstrap peer itself.
  DhtOptions options;
  options.bootstrap.push_back(absl::StrCat("127.0.0.1:", nodes_[1]->port()));
  absl::StatusOr<std::unique_ptr<DhtRegistry>> fresh =
      DhtRegistry::Start(options);
  ASSERT_TRUE(fresh.ok()) << fresh.status();

  absl::StatusOr<std::vector<NodeRecord>> found =
      (*fresh)->FetchSpan(kModel, 0, 5, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->size(), 3u);
}

TEST_F(SwarmTest, LateJoinerFinds) {
  std::unique_ptr<DhtRegistry> late = StartRegistry({}, nodes_[2]->port());
  ASSERT_NE(late, nullptr);
  absl::StatusOr<std::vector<NodeRecord>> found =
      late->FetchSpan(kModel, 0, 5, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->size(), 3u);
}

TEST(RootRegistryTest, ReadOnlyRootFetches) {
  // A read-only registry that only starts the swarm, as `pollen local-swarm`
  // and the swarm tests use it. Its peers join it but it never contacts them
  // before the fetch.
  std::unique_ptr<DhtRegistry> root = StartRegistry({}, 0);
  ASSERT_NE(root, nullptr);
  std::vector<std::unique_ptr<DhtRegistry>> nodes;
  for (int i = 0; i < 2; ++i) {
    nodes.push_back(
        StartRegistry(NewIdentity(absl::StrCat("node-", i)), root->port()));
    ASSERT_NE(nodes.back(), nullptr);
    const absl::Status announced = nodes.back()->Announce(
        MakeRecord(nodes.back()->node_id(), kModel, i, i + 1), kTimeout);
    ASSERT_TRUE(announced.ok()) << announced;
  }

  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<NodeRecord>> found =
      root->FetchSpan(kModel, 0, 2, kTimeout);
  const absl::Duration elapsed = absl::Now() - start;
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->size(), 2u);
  EXPECT_LT(elapsed, absl::Milliseconds(500));
}

TEST(LargeSwarmTest, EightNodesThirtyTwoBlocks) {
  constexpr int kNodes = 8;
  constexpr int kBlocksPerNode = 4;
  std::vector<std::unique_ptr<DhtRegistry>> nodes;
  for (int i = 0; i < kNodes; ++i) {
    // Each node joins through the one before it.
    nodes.push_back(StartRegistry(NewIdentity(absl::StrCat("node-", i)),
                                  i == 0 ? 0 : nodes.back()->port()));
    ASSERT_NE(nodes.back(), nullptr);
  }
  for (int i = 0; i < kNodes; ++i) {
    const NodeRecord record =
        MakeRecord(nodes[i]->node_id(), "large", i * kBlocksPerNode,
                   (i + 1) * kBlocksPerNode);
    const absl::Status announced = nodes[i]->Announce(record, kTimeout);
    ASSERT_TRUE(announced.ok()) << announced;
  }

  std::unique_ptr<DhtRegistry> client = StartRegistry({}, nodes[3]->port());
  ASSERT_NE(client, nullptr);
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<NodeRecord>> found =
      client->FetchSpan("large", 0, kNodes * kBlocksPerNode, kTimeout);
  const absl::Duration elapsed = absl::Now() - start;
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->size(), static_cast<size_t>(kNodes));
  EXPECT_LT(elapsed, absl::Seconds(1));
}

// Sends the default logger to a string at debug level while in scope.
class CapturedLog {
 public:
  CapturedLog() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(stream_);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("test", sink));
    spdlog::set_level(spdlog::level::debug);
  }
  ~CapturedLog() {
    spdlog::set_default_logger(previous_);
    spdlog::set_level(spdlog::level::info);
  }

  std::string text() const { return stream_.str(); }

 private:
  std::shared_ptr<spdlog::logger> previous_;
  std::ostringstream stream_;
};

TEST(DhtLogTest, RejectionLoggedAtDebug) {
  CapturedLog log;
  std::unique_ptr<DhtRegistry> node = StartRegistry(NewIdentity("a"), 0);
  ASSERT_NE(node, nullptr);
  std::unique_ptr<DhtRegistry> client = StartRegistry({}, node->port());
  ASSERT_NE(client, nullptr);
  const NodeRecord claim = MakeRecord(node->node_id(), kModel, 0, 1);
  ASSERT_TRUE(node->PutValueForTesting(BlockKey(kModel, 0),
                                       MakeValue(claim, {}), kTimeout)
                  .ok());

  absl::StatusOr<std::vector<NodeRecord>> found =
      client->FetchBlock(kModel, 0, kTimeout);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_TRUE(found->empty());
  EXPECT_EQ(client->rejected_value_count(), 1u);
  EXPECT_TRUE(absl::StrContains(log.text(), "is not signed")) << log.text();
  EXPECT_TRUE(absl::StrContains(log.text(), "opendht:")) << log.text();
}

}  // namespace
}  // namespace pollen
