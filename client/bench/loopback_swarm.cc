#include "client/bench/loopback_swarm.h"

#include <signal.h>
#include <stdlib.h>

#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::bench {
namespace {

namespace fs = std::filesystem;

// How long a node may take to exit after SIGTERM: withdrawing its records
// takes up to 5 s and draining sessions up to its --drain-timeout-s of 5 s.
constexpr absl::Duration kStopGrace = absl::Seconds(30);

absl::StatusOr<std::string> MakeTemporaryFolder() {
  std::string pattern = (fs::temp_directory_path() / "pollen-bench-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("cannot create a temporary folder like ", pattern));
  }
  return pattern;
}

}  // namespace

LoopbackSwarm::LoopbackSwarm(LoopbackSwarmOptions options, std::string model_id,
                             std::string work_dir)
    : options_(std::move(options)),
      model_id_(std::move(model_id)),
      work_dir_(std::move(work_dir)) {}

LoopbackSwarm::~LoopbackSwarm() { Stop(); }

absl::StatusOr<std::unique_ptr<LoopbackSwarm>> LoopbackSwarm::Start(
    const LoopbackSwarmOptions& options, const std::string& model_id,
    int num_blocks) {
  if (options.num_nodes < 1 || options.num_nodes > num_blocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("a swarm of ", options.num_nodes, " nodes cannot split ",
                     num_blocks, " blocks; use 1..", num_blocks, " nodes"));
  }
  POLLEN_ASSIGN_OR_RETURN(std::string work_dir, MakeTemporaryFolder());
  std::unique_ptr<LoopbackSwarm> swarm(
      new LoopbackSwarm(options, model_id, std::move(work_dir)));

  // The DHT bootstrap node lives in this process.
  POLLEN_ASSIGN_OR_RETURN(swarm->bootstrap_, DhtRegistry::Start(DhtOptions{}));
  const std::string peer = absl::StrCat("127.0.0.1:", swarm->bootstrap_->port());
  POLLEN_LOG_INFO("starting {} nodes for {} ({} blocks), DHT at {}, logs in {}",
                  options.num_nodes, model_id, num_blocks, peer,
                  swarm->work_dir_);

  // The nodes, each with a contiguous share of the blocks. They keep their
  // blocks (no rebalancing) and measure their throughput into their own
  // folder, not the user's cache.
  for (int i = 0; i < options.num_nodes; ++i) {
    const int start = i * num_blocks / options.num_nodes;
    const int end = (i + 1) * num_blocks / options.num_nodes;
    const std::string node_dir = absl::StrCat(swarm->work_dir_, "/node-", i);
    std::error_code error;
    fs::create_directories(node_dir, error);
    std::vector<std::string> argv = {
        options.pollen_binary, "node", "--model", options.model_dir,
        "--model-id", model_id, "--blocks", absl::StrCat(start, ":", end),
        "--host", "127.0.0.1", "--port", "0", "--initial-peers", peer,
        "--identity", node_dir + "/identity", "--cache-tokens",
        absl::StrCat(options.cache_tokens), "--dtype", options.dtype,
        "--public-name", absl::StrCat("bench-", i), "--rebalance-period-s", "0",
        "--throughput-cache", node_dir + "/throughput.json",
        "--drain-timeout-s", "5"};
    if (options.threads > 0) {
      argv.insert(argv.end(), {"--threads", absl::StrCat(options.threads)});
    }
    auto child = cli::ChildProcess::Start(argv, node_dir + "/node.log");
    if (!child.ok()) {
      swarm->keep_work_dir_ = true;
      return child.status();
    }
    swarm->nodes_.push_back(std::move(*child));
  }

  POLLEN_ASSIGN_OR_RETURN(swarm->swarm_, client::SwarmClient::Connect({peer}));
  absl::Status ready = swarm->WaitForRoute(num_blocks);
  if (!ready.ok()) {
    swarm->keep_work_dir_ = true;
    return ready;
  }
  return swarm;
}

absl::Status LoopbackSwarm::WaitForRoute(int num_blocks) {
  const absl::Time deadline = absl::Now() + options_.startup_timeout;
  while (true) {
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (!nodes_[i].IsRunning()) {
        return absl::UnavailableError(absl::StrCat(
            "node ", i, " exited during startup; its log (",
            nodes_[i].log_path(), ") ends with:\n", nodes_[i].LogTail()));
      }
    }
    auto route = swarm_->FindRoute(model_id_, 0, num_blocks, absl::ZeroDuration());
    if (route.ok() && static_cast<int>(route->size()) == options_.num_nodes) {
      route_ = std::move(*route);
      POLLEN_LOG_INFO("all {} blocks are served by {} nodes", num_blocks,
                      route_.size());
      return absl::OkStatus();
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the nodes did not announce every block within ",
          absl::FormatDuration(options_.startup_timeout), "; node logs are in ",
          work_dir_, route.ok() ? "" : absl::StrCat(": ", route.status().message())));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
}

absl::StatusOr<std::unique_ptr<client::InferenceChain>>
LoopbackSwarm::OpenSession(int64_t max_length) {
  client::ChainOptions chain_options;
  chain_options.model_id = model_id_;
  chain_options.batch_size = 1;
  chain_options.max_length = max_length;
  chain_options.step_timeout = options_.step_timeout;
  chain_options.push = options_.push;
  chain_options.compression = options_.compression;
  return client::InferenceChain::Open(channels_, route_, chain_options);
}

void LoopbackSwarm::Stop() {
  if (nodes_.empty() && bootstrap_ == nullptr) return;

  // One SIGTERM each: the node withdraws its records and exits. A second
  // SIGTERM during that shutdown can kill it, so ChildProcess::Stop, which
  // sends another, comes only after the grace period.
  for (cli::ChildProcess& node : nodes_) node.Signal(SIGTERM);
  for (size_t i = 0; i < nodes_.size(); ++i) {
    int status = nodes_[i].Wait(kStopGrace);
    if (status == -1) {
      POLLEN_LOG_WARN("node {} still runs {} after SIGTERM; killing it", i,
                      absl::FormatDuration(kStopGrace));
      status = nodes_[i].Stop(absl::Seconds(1));
    }
    if (status != 0) {
      POLLEN_LOG_WARN("node {} exited with wait status {}; its log is {}", i,
                      status, nodes_[i].log_path());
      keep_work_dir_ = true;
    }
  }
  nodes_.clear();
  swarm_.reset();
  bootstrap_.reset();

  if (keep_work_dir_) {
    POLLEN_LOG_WARN("keeping the node logs in {}", work_dir_);
    return;
  }
  std::error_code ignored;
  fs::remove_all(work_dir_, ignored);
}

}  // namespace pollen::bench
