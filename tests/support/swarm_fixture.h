// Real swarms on loopback for tests: an in-process DHT bootstrap node and
// `pollen node` processes.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/cli/child_process.h"
#include "common/dht_registry.h"
#include "tests/support/test_support.h"

namespace pollen::testing {

struct NodeHandle {
  std::string name;     // --public-name, unique in the swarm
  std::string address;  // host:port of its BlockService, once announced
  cli::ChildProcess process;
};

class LocalSwarm {
 public:
  // Starts the bootstrap DHT node; aborts the test binary if it cannot.
  LocalSwarm();

  // "127.0.0.1:PORT" of the bootstrap node.
  std::string peer() const;

  // Starts `pollen node` for blocks [start, end) of the checkpoint in
  // `model_dir`, announced as `model_id`, and waits until its record is in
  // the DHT. Returns the node's index.
  absl::StatusOr<int> StartNode(const std::string& model_dir,
                                const std::string& model_id, int start,
                                int end,
                                const std::vector<std::string>& extra_flags = {});

  NodeHandle& node(int index) { return *nodes_[index]; }
  DhtRegistry& registry() { return *registry_; }
  const std::string& work_dir() const { return work_dir_; }

 private:
  std::unique_ptr<DhtRegistry> registry_;
  std::string work_dir_;
  std::vector<std::unique_ptr<NodeHandle>> nodes_;
};

// Result of a finished command.
struct CommandResult {
  int exit_code = -1;  // -1 when it timed out and was killed
  std::string stdout_text;
  std::string stderr_text;
};

// Runs `argv` with `stdin_text` as input and waits up to `timeout`.
CommandResult RunCommand(const std::vector<std::string>& argv,
                         const std::string& stdin_text = "",
                         absl::Duration timeout = absl::Seconds(120));

// A command driven line by line through pipes, such as `pollen chat`.
// Its stderr goes to a file. Destruction kills it if it still runs.
class InteractiveCommand {
 public:
  explicit InteractiveCommand(const std::vector<std::string>& argv);
  ~InteractiveCommand();
  InteractiveCommand(const InteractiveCommand&) = delete;
  InteractiveCommand& operator=(const InteractiveCommand&) = delete;

  void WriteLine(const std::string& line);
  // Returns the next stdout line without its newline, or an error when
  // none arrives within `timeout` or stdout closes.
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout);
  // Closes stdin and waits for the exit code (-1 after a timeout).
  int Finish(absl::Duration timeout);
  std::string StderrText() const;

 private:
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
  int stdout_fd_ = -1;
  std::string buffer_;
  TempDir dir_;
};

}  // namespace pollen::testing
