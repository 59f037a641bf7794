#include "client/cli/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pollen::cli {

std::string SelfExecutablePath() {
  std::error_code error;
  const auto path = std::filesystem::read_symlink("/proc/self/exe", error);
  return error ? std::string() : path.string();
}

bool SetSleepingIdleThreads() {
  bool set_any = false;
  for (const EnvironmentDefault& variable : kSleepingIdleThreads) {
    if (std::getenv(variable.name) != nullptr) continue;
    setenv(variable.name, variable.value, /*overwrite=*/0);
    set_any = true;
  }
  return set_any;
}

absl::StatusOr<ChildProcess> ChildProcess::Start(
    const std::vector<std::string>& argv, const std::string& log_path) {
  if (argv.empty()) return absl::InvalidArgumentError("empty command line");
  const int log_fd =
      open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot open log file ", log_path, ": ", std::strerror(errno)));
  }
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);

  // The child's environment: this one, with idle threads that sleep
  // unless the caller chose otherwise (see kSleepingIdleThreads). On the
  // 2-core bench machine, spinning OpenMP threads cost 12 ms per hop and
  // token.
  std::vector<std::string> defaults;
  for (const EnvironmentDefault& variable : kSleepingIdleThreads) {
    if (std::getenv(variable.name) == nullptr) {
      defaults.push_back(absl::StrCat(variable.name, "=", variable.value));
    }
  }
  std::vector<char*> environment;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    environment.push_back(*entry);
  }
  for (std::string& entry : defaults) environment.push_back(entry.data());
  environment.push_back(nullptr);

  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    close(log_fd);
    return absl::UnavailableError(absl::StrCat("fork failed: ", std::strerror(errno)));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);
    // The parent may block stop signals; the child starts with none blocked.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    const int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
    execve(args[0], args.data(), environment.data());
    _exit(127);
  }
  close(log_fd);
  return ChildProcess(pid, log_path);
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(other.pid_),
      log_path_(std::move(other.log_path_)),
      exited_(other.exited_),
      exit_status_(other.exit_status_) {
  other.pid_ = -1;
}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0) Stop();
    pid_ = other.pid_;
    log_path_ = std::move(other.log_path_);
    exited_ = other.exited_;
    exit_status_ = other.exit_status_;
    other.pid_ = -1;
  }
  return *this;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0) Stop();
}

bool ChildProcess::IsRunning() {
  if (pid_ <= 0 || exited_) return false;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    exited_ = true;
    exit_status_ = status;
    return false;
  }
  return true;
}

void ChildProcess::Signal(int signal_number) {
  if (IsRunning()) kill(pid_, signal_number);
}

int ChildProcess::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (IsRunning()) {
    if (absl::Now() >= deadline) return -1;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return exit_status_;
}

int ChildProcess::Stop(absl::Duration grace) {
  if (pid_ <= 0) return exit_status_;
  Signal(SIGTERM);
  if (Wait(grace) == -1) {
    Signal(SIGKILL);
    Wait(absl::InfiniteDuration());
  }
  return exit_status_;
}

std::string ChildProcess::LogTail(int max_lines) const {
  std::ifstream log(log_path_);
  std::deque<std::string> lines;
  for (std::string line; std::getline(log, line);) {
    lines.push_back(line);
    if (static_cast<int>(lines.size()) > max_lines) lines.pop_front();
  }
  return absl::StrJoin(lines, "\n");
}

}  // namespace pollen::cli
