// Paths and reference data shared by the test suites.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace pollen::testing {

// Folder with models/ and tokenizers/ (POLLEN_SHARED_DIR at build time,
// overridden by the POLLEN_SHARED_DIR environment variable).
std::string SharedDir();
std::string Stories260kDir();
std::string Llama2TokenizerPath();

// The `pollen` binary under test.
std::string PollenBinary();

// stories260k, greedy, prompt "Once upon a time" with BOS.
extern const std::vector<int> kStoriesPromptIds;
extern const std::vector<int> kStoriesReferenceIds;  // first 48 new ids
extern const char kStoriesPrompt[];
// The prompt and the 48 reference ids decoded: the model's own continuation.
extern const char kStoriesReferenceText[];

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Returns a TCP port on 127.0.0.1 that was free when requested.
int FreePort();

// Returns the contents of the file at `path`, or "" when it cannot be read.
std::string ReadFile(const std::string& path);

// Polls `condition` every `interval` for up to `timeout`; returns whether it
// became true.
template <typename Condition>
bool Eventually(Condition condition, absl::Duration timeout,
                absl::Duration interval = absl::Milliseconds(100)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (condition()) return true;
    absl::SleepFor(interval);
  }
  return condition();
}

}  // namespace pollen::testing
