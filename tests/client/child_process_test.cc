#include "client/cli/child_process.h"

#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace pollen::cli {
namespace {

using ::pollen::testing::TempDir;

// Runs `sh -c script` and returns its log.
std::string RunShell(const std::string& script) {
  TempDir dir;
  const std::string log = dir.path() + "/child.log";
  auto child = ChildProcess::Start({"/bin/sh", "-c", script}, log);
  EXPECT_TRUE(child.ok()) << child.status();
  if (!child.ok()) return "";
  EXPECT_EQ(child->Wait(absl::Seconds(10)), 0);
  return child->LogTail();
}

TEST(ChildProcess, IdleThreadsSleepUnlessTheCallerChose) {
  unsetenv("OMP_WAIT_POLICY");
  setenv("OPENBLAS_THREAD_TIMEOUT", "9", /*overwrite=*/1);
  EXPECT_EQ(RunShell("echo \"$OMP_WAIT_POLICY $OPENBLAS_THREAD_TIMEOUT\""),
            "PASSIVE 9");
  unsetenv("OPENBLAS_THREAD_TIMEOUT");
}

TEST(ChildProcess, SetSleepingIdleThreadsSetsOnlyUnsetVariables) {
  setenv("OMP_WAIT_POLICY", "ACTIVE", /*overwrite=*/1);
  unsetenv("OPENBLAS_THREAD_TIMEOUT");
  EXPECT_TRUE(SetSleepingIdleThreads());
  EXPECT_STREQ(std::getenv("OMP_WAIT_POLICY"), "ACTIVE");
  EXPECT_STREQ(std::getenv("OPENBLAS_THREAD_TIMEOUT"), "4");
  EXPECT_FALSE(SetSleepingIdleThreads());
  unsetenv("OMP_WAIT_POLICY");
  unsetenv("OPENBLAS_THREAD_TIMEOUT");
}

}  // namespace
}  // namespace pollen::cli
