#include "tests/support/swarm_fixture.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

std::string MakeWorkDir() {
  std::string pattern =
      (std::filesystem::temp_directory_path() / "pollen-swarm-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) std::abort();
  return pattern;
}

}  // namespace

LocalSwarm::LocalSwarm() : work_dir_(MakeWorkDir()) {
  auto registry = DhtRegistry::Start(DhtOptions{});
  if (!registry.ok()) {
    fprintf(stderr, "cannot start bootstrap DHT: %s\n",
            registry.status().ToString().c_str());
    std::abort();
  }
  registry_ = std::move(*registry);
}

std::string LocalSwarm::peer() const {
  return absl::StrCat("127.0.0.1:", registry_->port());
}

absl::StatusOr<int> LocalSwarm::StartNode(
    const std::string& model_dir, const std::string& model_id, int start,
    int end, const std::vector<std::string>& extra_flags) {
  const int index = static_cast<int>(nodes_.size());
  const std::string name = absl::StrCat("test-node-", index);
  const std::string node_dir = absl::StrCat(work_dir_, "/", name);
  std::filesystem::create_directories(node_dir);

  std::vector<std::string> argv = {
      PollenBinary(), "node", "--model", model_dir, "--model-id", model_id,
      "--blocks", absl::StrCat(start, ":", end), "--port", "0", "--host",
      "127.0.0.1", "--initial-peers", peer(), "--identity",
      node_dir + "/identity", "--public-name", name, "--throughput-cache",
      node_dir + "/throughput.json",
      // Short periods keep restarts and withdrawals quick in tests.
      "--announce-period-s", "2", "--record-ttl-s", "10"};
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  auto process = cli::ChildProcess::Start(argv, node_dir + "/node.log");
  if (!process.ok()) return process.status();

  auto handle = std::make_unique<NodeHandle>(
      NodeHandle{name, "", std::move(*process)});

  // Wait for the node's own record, found by its unique name.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (handle->address.empty()) {
    if (!handle->process.IsRunning()) {
      return absl::UnavailableError(absl::StrCat(
          name, " exited during startup:\n", handle->process.LogTail()));
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          name, " did not announce itself within 60s:\n",
          handle->process.LogTail()));
    }
    auto records = registry_->FetchBlock(model_id, start, absl::Seconds(2));
    if (records.ok()) {
      for (const v1::NodeRecord& record : *records) {
        if (record.public_name() == name &&
            record.state() == v1::NODE_STATE_ONLINE) {
          handle->address = record.address();
        }
      }
    }
    if (handle->address.empty()) absl::SleepFor(absl::Milliseconds(100));
  }
  nodes_.push_back(std::move(handle));
  return index;
}

CommandResult RunCommand(const std::vector<std::string>& argv,
                         const std::string& stdin_text,
                         absl::Duration timeout) {
  TempDir dir;
  const std::string in_path = dir.path() + "/stdin";
  const std::string out_path = dir.path() + "/stdout";
  const std::string err_path = dir.path() + "/stderr";
  std::ofstream(in_path) << stdin_text;

  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);

  const pid_t pid = fork();
  if (pid == 0) {
    const int in_fd = open(in_path.c_str(), O_RDONLY);
    const int out_fd = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err_fd = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(in_fd, STDIN_FILENO);
    dup2(out_fd, STDOUT_FILENO);
    dup2(err_fd, STDERR_FILENO);
    execv(args[0], args.data());
    _exit(127);
  }

  CommandResult result;
  const absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (absl::Now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      result.stdout_text = ReadFile(out_path);
      result.stderr_text = ReadFile(err_path);
      return result;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.stdout_text = ReadFile(out_path);
  result.stderr_text = ReadFile(err_path);
  return result;
}

InteractiveCommand::InteractiveCommand(const std::vector<std::string>& argv) {
  int input[2];
  int output[2];
  if (pipe(input) != 0 || pipe(output) != 0) std::abort();
  const std::string err_path = dir_.path() + "/stderr";
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);

  pid_ = fork();
  if (pid_ == 0) {
    const int err_fd = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(input[0], STDIN_FILENO);
    dup2(output[1], STDOUT_FILENO);
    dup2(err_fd, STDERR_FILENO);
    close(input[1]);
    close(output[0]);
    execv(args[0], args.data());
    _exit(127);
  }
  close(input[0]);
  close(output[1]);
  stdin_fd_ = input[1];
  stdout_fd_ = output[0];
}

InteractiveCommand::~InteractiveCommand() {
  if (stdin_fd_ >= 0) close(stdin_fd_);
  if (stdout_fd_ >= 0) close(stdout_fd_);
  if (pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

void InteractiveCommand::WriteLine(const std::string& line) {
  const std::string data = line + "\n";
  if (write(stdin_fd_, data.data(), data.size()) < 0) {
    fprintf(stderr, "write to command failed\n");
  }
}

absl::StatusOr<std::string> InteractiveCommand::ReadLine(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const size_t newline = buffer_.find('\n');
    if (newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      return line;
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError("no output line in time");
    }
    pollfd poll_fd{stdout_fd_, POLLIN, 0};
    const int ready = poll(&poll_fd, 1,
                           static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (ready <= 0) continue;
    char chunk[4096];
    const ssize_t count = read(stdout_fd_, chunk, sizeof(chunk));
    if (count <= 0) return absl::UnavailableError("stdout closed");
    buffer_.append(chunk, count);
  }
}

int InteractiveCommand::Finish(absl::Duration timeout) {
  close(stdin_fd_);
  stdin_fd_ = -1;
  const absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  while (waitpid(pid_, &status, WNOHANG) == 0) {
    if (absl::Now() > deadline) return -1;
    absl::SleepFor(absl::Milliseconds(20));
  }
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string InteractiveCommand::StderrText() const {
  return ReadFile(dir_.path() + "/stderr");
}

}  // namespace pollen::testing
