#include "node/next_hop_prober.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"
#include "node/block_span.h"
#include "pollen/v1/pollen.grpc.pb.h"

namespace pollen::node {
namespace {

constexpr absl::Duration kFetchTimeout = absl::Seconds(5);

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration timeout) {
  return std::chrono::system_clock::now() +
         absl::ToChronoMilliseconds(timeout);
}

}  // namespace

NextHopProber::NextHopProber(DhtRegistry* registry,
                             const ServiceContext* context,
                             absl::Duration period)
    : registry_(registry), context_(context), period_(period) {}

NextHopProber::~NextHopProber() { Stop(); }

void NextHopProber::Start() {
  thread_ = std::thread([this] { Run(); });
}

void NextHopProber::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void NextHopProber::Run() {
  while (true) {
    ProbeOnce();
    absl::MutexLock lock(&mu_);
    if (mu_.AwaitWithTimeout(absl::Condition(&stop_), period_)) return;
  }
}

bool NextHopProber::Announced(const std::string& address, int block) const {
  absl::MutexLock lock(&mu_);
  return block == fetched_block_ && fetched_addresses_.count(address) > 0;
}

std::map<std::string, double> NextHopProber::RoundTripTimesMs() const {
  absl::MutexLock lock(&mu_);
  return rtt_ms_;
}

absl::StatusOr<double> NextHopProber::Ping(const std::string& address) {
  std::shared_ptr<grpc::Channel>& channel = channels_[address];
  if (channel == nullptr) {
    channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  }
  // Connect first, so that a new connection's handshake is not timed.
  if (!channel->WaitForConnected(DeadlineAfter(kPingDeadline))) {
    return absl::UnavailableError(absl::StrCat(
        "could not connect to ", address, " within ",
        absl::FormatDuration(kPingDeadline)));
  }

  auto stub = v1::BlockService::NewStub(channel);
  grpc::ClientContext call;
  call.set_deadline(DeadlineAfter(kPingDeadline));
  v1::InfoResponse response;
  const auto started = std::chrono::steady_clock::now();
  const grpc::Status status = stub->Info(&call, v1::InfoRequest(), &response);
  const auto finished = std::chrono::steady_clock::now();
  if (!status.ok()) return FromGrpcStatus(status);
  return std::chrono::duration<double, std::milli>(finished - started).count();
}

void NextHopProber::ProbeOnce() {
  const std::shared_ptr<const BlockSpan> span = context_->spans.current();
  const int next_block = span->end();
  if (next_block >= context_->config.num_hidden_layers) {
    // The span ends the model: there is no next hop.
    absl::MutexLock lock(&mu_);
    rtt_ms_.clear();
    return;
  }

  absl::StatusOr<std::vector<v1::NodeRecord>> records =
      registry_->FetchBlock(context_->model_id, next_block, kFetchTimeout);
  if (!records.ok()) {
    POLLEN_LOG_DEBUG("no records of block {} to probe: {}", next_block,
                     records.status().ToString());
    return;
  }

  {
    absl::MutexLock lock(&mu_);
    fetched_block_ = next_block;
    fetched_addresses_.clear();
    for (const v1::NodeRecord& record : *records) {
      if (record.state() != v1::NODE_STATE_OFFLINE) {
        fetched_addresses_.insert(record.address());
      }
    }
  }

  // Candidates: ONLINE nodes other than this one, those measured before
  // first, then by node id.
  const std::map<std::string, double> previous = RoundTripTimesMs();
  std::vector<const v1::NodeRecord*> candidates;
  for (const v1::NodeRecord& record : *records) {
    if (record.state() == v1::NODE_STATE_ONLINE &&
        record.node_id() != context_->node_id) {
      candidates.push_back(&record);
    }
  }
  std::sort(candidates.begin(), candidates.end(),
            [&previous](const v1::NodeRecord* a, const v1::NodeRecord* b) {
              const bool a_known = previous.count(a->node_id()) > 0;
              const bool b_known = previous.count(b->node_id()) > 0;
              if (a_known != b_known) return a_known;
              return a->node_id() < b->node_id();
            });
  if (candidates.size() > kMaxProbedNodes) candidates.resize(kMaxProbedNodes);

  std::map<std::string, double> measured;
  for (const v1::NodeRecord* record : candidates) {
    const absl::StatusOr<double> rtt = Ping(record->address());
    if (!rtt.ok()) {
      POLLEN_LOG_DEBUG("ping of next-hop node {} at {} failed: {}",
                       record->node_id(), record->address(),
                       rtt.status().ToString());
      continue;
    }
    auto known = previous.find(record->node_id());
    measured[record->node_id()] =
        known == previous.end()
            ? *rtt
            : (1 - kRttSmoothing) * known->second + kRttSmoothing * *rtt;
  }

  // Keep connections only to the nodes still probed.
  for (auto it = channels_.begin(); it != channels_.end();) {
    const bool used = std::any_of(
        candidates.begin(), candidates.end(),
        [&it](const v1::NodeRecord* record) { return record->address() == it->first; });
    it = used ? std::next(it) : channels_.erase(it);
  }

  absl::MutexLock lock(&mu_);
  rtt_ms_ = std::move(measured);
}

}  // namespace pollen::node
