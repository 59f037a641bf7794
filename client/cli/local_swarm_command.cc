// `pollen local-swarm`: a whole swarm on loopback for a first try.
//
// Starts a DHT bootstrap node in this process and N `pollen node` processes
// that split the blocks evenly, waits until every block is announced,
// generates, and stops the nodes.
#include <signal.h>
#include <stdlib.h>

#include <filesystem>
#include <iostream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "client/cli/child_process.h"
#include "client/cli/commands.h"
#include "client/swarm_client.h"
#include "common/checkpoint.h"
#include "common/dht_registry.h"
#include "common/logging.h"
#include "common/model_id.h"

namespace pollen::cli {
namespace {

constexpr absl::Duration kStartupWait = absl::Seconds(120);

// Removes a temporary folder on scope exit unless it was given by the user.
class WorkDir {
 public:
  explicit WorkDir(const std::string& requested) {
    if (!requested.empty()) {
      path_ = requested;
      std::filesystem::create_directories(path_);
      return;
    }
    std::string pattern =
        (std::filesystem::temp_directory_path() / "pollen-swarm-XXXXXX").string();
    if (mkdtemp(pattern.data()) != nullptr) {
      path_ = pattern;
      owned_ = true;
    }
  }
  ~WorkDir() {
    std::error_code ignored;
    if (owned_) std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }
  void Keep() { owned_ = false; }

 private:
  std::string path_;
  bool owned_ = false;
};

// Waits until every block has an online node, watching for nodes that die.
absl::Status WaitForCoverage(int num_blocks, const std::string& model_id,
                             client::SwarmClient& swarm,
                             std::vector<ChildProcess>& nodes) {
  const absl::Time deadline = absl::Now() + kStartupWait;
  while (true) {
    for (size_t i = 0; i < nodes.size(); ++i) {
      if (!nodes[i].IsRunning()) {
        return absl::UnavailableError(absl::StrCat(
            "node ", i, " exited during startup; its log (", nodes[i].log_path(),
            ") ends with:\n", nodes[i].LogTail()));
      }
    }
    auto route = swarm.FindRoute(model_id, 0, num_blocks, absl::ZeroDuration());
    if (route.ok()) return absl::OkStatus();
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "nodes did not announce every block within ",
          absl::FormatDuration(kStartupWait), ": ", route.status().message()));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
}

}  // namespace

int RunLocalSwarmCommand(const LocalSwarmCommandOptions& options) {
  const GenerateCommandOptions& generate = options.generate;
  auto checkpoint = Checkpoint::Open(generate.client.model_dir);
  if (!checkpoint.ok()) {
    std::cerr << "error: " << checkpoint.status().message() << "\n";
    return 1;
  }
  const int num_blocks =
      static_cast<int>((*checkpoint)->config().num_hidden_layers);
  if (options.num_nodes < 1 || options.num_nodes > num_blocks) {
    std::cerr << "error: --nodes " << options.num_nodes << " must be in 1.."
              << num_blocks << " (the model's blocks)\n";
    return 2;
  }
  const std::string model_id = generate.client.model_id.empty()
                                   ? DefaultModelId(generate.client.model_dir)
                                   : generate.client.model_id;

  // The bootstrap DHT node lives in this process for the swarm's lifetime.
  auto bootstrap = DhtRegistry::Start(DhtOptions{});
  if (!bootstrap.ok()) {
    std::cerr << "error: " << bootstrap.status().message() << "\n";
    return 1;
  }
  const std::string peer = absl::StrCat("127.0.0.1:", (*bootstrap)->port());
  WorkDir work_dir(options.work_dir);
  POLLEN_LOG_INFO("local swarm of {} nodes for {}, DHT at {}, logs in {}",
                  options.num_nodes, model_id, peer, work_dir.path());

  // Start the nodes, each with an even share of the blocks.
  std::vector<ChildProcess> nodes;
  for (int i = 0; i < options.num_nodes; ++i) {
    const int start = i * num_blocks / options.num_nodes;
    const int end = (i + 1) * num_blocks / options.num_nodes;
    const std::string node_dir = absl::StrCat(work_dir.path(), "/node-", i);
    std::filesystem::create_directories(node_dir);
    auto child = ChildProcess::Start(
        {SelfExecutablePath(), "node", "--model", generate.client.model_dir,
         "--model-id", model_id, "--blocks", absl::StrCat(start, ":", end),
         "--port", "0", "--host", "127.0.0.1", "--initial-peers", peer,
         "--identity", node_dir + "/identity", "--cache-tokens",
         absl::StrCat(options.cache_tokens), "--dtype", options.dtype,
         "--quantize", options.quantize, "--public-name", absl::StrCat("local-", i)},
        node_dir + "/node.log");
    if (!child.ok()) {
      std::cerr << "error: " << child.status().message() << "\n";
      return 1;
    }
    nodes.push_back(std::move(*child));
  }

  auto swarm = client::SwarmClient::Connect({peer});
  absl::Status ready = swarm.ok() ? WaitForCoverage(num_blocks, model_id,
                                                    **swarm, nodes)
                                  : swarm.status();
  int exit_code = 1;
  if (ready.ok()) {
    POLLEN_LOG_INFO("all {} blocks are served; generating", num_blocks);
    GenerateCommandOptions with_peer = generate;
    with_peer.client.initial_peers = {peer};
    with_peer.client.model_id = model_id;
    exit_code = RunGenerateCommand(with_peer);
  } else {
    std::cerr << "error: " << ready.message() << "\n";
    work_dir.Keep();
  }

  // Stop the nodes; each withdraws its records before it exits.
  for (ChildProcess& node : nodes) node.Signal(SIGTERM);
  for (ChildProcess& node : nodes) node.Stop();
  POLLEN_LOG_INFO("local swarm stopped");
  return exit_code;
}

}  // namespace pollen::cli
