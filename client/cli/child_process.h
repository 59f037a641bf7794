// Child processes started by `pollen local-swarm` and by tests.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace pollen::cli {

// Environment variables, with their values, that make idle OpenMP
// (libgomp) and OpenBLAS threads sleep at once instead of spinning. Nodes
// that share cores need them, because a spinning thread takes the core
// from the node that computes. Each applies only where it is unset.
struct EnvironmentDefault {
  const char* name;
  const char* value;
};
inline constexpr EnvironmentDefault kSleepingIdleThreads[] = {
    {"OMP_WAIT_POLICY", "PASSIVE"}, {"OPENBLAS_THREAD_TIMEOUT", "4"}};

// Sets in this process's environment each variable of
// kSleepingIdleThreads that is unset, and returns whether it set any. The libraries
// read them when they load, so only processes started afterwards (or this
// one, started again) see them.
bool SetSleepingIdleThreads();

// A started program whose stdout and stderr go to a log file. It gets this
// process's environment plus the variables of kSleepingIdleThreads that are
// unset.
// The child is sent SIGTERM if this process dies first. Destruction stops it (SIGTERM,
// then SIGKILL after a grace period). Not thread-safe.
class ChildProcess {
 public:
  static absl::StatusOr<ChildProcess> Start(const std::vector<std::string>& argv,
                                            const std::string& log_path);
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }

  // True while the process has not exited. Records its exit status.
  bool IsRunning();

  // Sends `signal_number` (SIGTERM, SIGKILL, ...).
  void Signal(int signal_number);

  // Sends SIGTERM and waits up to `grace` for the exit, then SIGKILL.
  // Returns the exit status as waitpid reports it.
  int Stop(absl::Duration grace = absl::Seconds(10));

  // Waits up to `timeout` for the process to exit by itself. Returns the
  // waitpid status, or -1 when it is still running.
  int Wait(absl::Duration timeout);

  // The last `max_lines` lines of the log file.
  std::string LogTail(int max_lines = 20) const;

 private:
  ChildProcess(pid_t pid, std::string log_path)
      : pid_(pid), log_path_(std::move(log_path)) {}

  pid_t pid_ = -1;
  std::string log_path_;
  bool exited_ = false;
  int exit_status_ = 0;
};

// Path of the running executable (/proc/self/exe).
std::string SelfExecutablePath();

}  // namespace pollen::cli
