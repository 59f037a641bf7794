#include "tests/support/test_support.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace pollen::testing {

const std::vector<int> kStoriesPromptIds = {1, 403, 407, 261, 378};
const std::vector<int> kStoriesReferenceIds = {
    432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
    401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282,
    295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
    266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432};
const char kStoriesPrompt[] = "Once upon a time";
const char kStoriesReferenceText[] =
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the park. One day, she saw a big, red ball. She wanted to play "
    "with it,";

std::string SharedDir() {
  if (const char* dir = std::getenv("POLLEN_SHARED_DIR")) return dir;
  return POLLEN_SHARED_DIR;
}

std::string Stories260kDir() { return SharedDir() + "/models/stories260k"; }

std::string Llama2TokenizerPath() {
  return SharedDir() + "/tokenizers/llama2/tokenizer.model";
}

std::string PollenBinary() { return POLLEN_BINARY; }

TempDir::TempDir() {
  std::string pattern =
      (std::filesystem::temp_directory_path() / "pollen-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) {
    throw std::runtime_error("mkdtemp failed for " + pattern);
  }
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path);
  std::stringstream content;
  content << file.rdbuf();
  return content.str();
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  close(fd);
  return ntohs(address.sin_port);
}

}  // namespace pollen::testing
