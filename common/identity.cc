#include "common/identity.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <system_error>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen {
namespace {

// RSA modulus size in bits: the minimum that OpenDHT 2.4 documents for
// PrivateKey::generate, which keeps identity creation fast.
constexpr unsigned kKeyBits = 2048;

absl::StatusOr<dht::crypto::Identity> GenerateIdentity(
    const std::string& name) {
  try {
    dht::crypto::Identity identity =
        dht::crypto::generateIdentity(name, {}, kKeyBits);
    if (!identity.first || !identity.second) {
      return absl::InternalError(absl::StrCat(
          "OpenDHT returned an empty identity for name '", name, "'"));
    }
    return identity;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(
        "failed to generate an identity for name '", name, "': ", e.what()));
  }
}

// Returns the status for errno `error`, and UNKNOWN when a failed call left
// errno at 0.
absl::Status FileError(int error, const std::string& message) {
  if (error == 0) return absl::UnknownError(message);
  return absl::ErrnoToStatus(error, message);
}

absl::StatusOr<std::vector<uint8_t>> ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    const int error = errno;
    return FileError(error,
                     absl::StrCat("failed to open identity file ", path));
  }
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(file)),
                             std::istreambuf_iterator<char>());
  if (file.bad()) {
    return absl::DataLossError(
        absl::StrCat("failed to read identity file ", path));
  }
  return bytes;
}

// Writes `bytes` to a temporary file beside `path` with permissions `mode`,
// then renames it over `path`, so readers never see a half-written file.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<uint8_t>& bytes,
                                 mode_t mode) {
  const std::string temp_path = absl::StrCat(path, ".tmp-", getpid());
  const int fd = open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, mode);
  if (fd < 0) {
    const int error = errno;
    return FileError(
        error, absl::StrCat("failed to create identity file ", temp_path));
  }

  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int error = errno;
      close(fd);
      unlink(temp_path.c_str());
      return FileError(
          error, absl::StrCat("failed to write identity file ", temp_path));
    }
    written += static_cast<size_t>(n);
  }

  if (fsync(fd) != 0 || close(fd) != 0) {
    const int error = errno;
    unlink(temp_path.c_str());
    return FileError(error,
                     absl::StrCat("failed to flush identity file ", temp_path));
  }
  if (rename(temp_path.c_str(), path.c_str()) != 0) {
    const int error = errno;
    unlink(temp_path.c_str());
    return FileError(
        error, absl::StrCat("failed to rename ", temp_path, " to ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<dht::crypto::Identity> LoadIdentity(
    const std::string& key_path, const std::string& cert_path) {
  POLLEN_ASSIGN_OR_RETURN(std::vector<uint8_t> key_bytes, ReadFile(key_path));
  POLLEN_ASSIGN_OR_RETURN(std::vector<uint8_t> cert_bytes, ReadFile(cert_path));

  // OpenDHT reports malformed keys and certificates by throwing
  // CryptoException.
  dht::crypto::Identity identity;
  try {
    identity.first = std::make_shared<dht::crypto::PrivateKey>(key_bytes);
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(
        "identity key file ", key_path,
        " is not a valid private key: ", e.what(), "; delete ", key_path,
        " and ", cert_path, " to create a new identity"));
  }
  try {
    identity.second = std::make_shared<dht::crypto::Certificate>(cert_bytes);
  } catch (const std::exception& e) {
    return absl::DataLossError(
        absl::StrCat("identity certificate file ", cert_path,
                     " is not a valid certificate: ", e.what()));
  }

  const dht::InfoHash key_id = identity.first->getPublicKey().getId();
  const dht::InfoHash cert_id = identity.second->getId();
  if (key_id != cert_id) {
    return absl::DataLossError(
        absl::StrCat("identity certificate file ", cert_path, " is for key ",
                     cert_id.toString(), " but ", key_path, " holds key ",
                     key_id.toString()));
  }
  return identity;
}

absl::Status SaveIdentity(const dht::crypto::Identity& identity,
                          const std::string& key_path,
                          const std::string& cert_path) {
  std::vector<uint8_t> key_bytes;
  std::vector<uint8_t> cert_bytes;
  try {
    key_bytes = identity.first->serialize();
    cert_bytes = identity.second->getPacked();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("failed to serialize identity for ",
                                            key_path, ": ", e.what()));
  }

  // The certificate goes first, so a crash between the two renames leaves a
  // certificate without a key. LoadOrCreateIdentity reports that state
  // instead of silently replacing the identity.
  POLLEN_RETURN_IF_ERROR(WriteFileAtomically(cert_path, cert_bytes, 0644));
  return WriteFileAtomically(key_path, key_bytes, 0600);
}

}  // namespace

absl::StatusOr<dht::crypto::Identity> LoadOrCreateIdentity(
    const std::string& path, const std::string& name) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        "identity path is empty; pass a path such as ~/.pollen/identity");
  }
  const std::string key_path = path + ".pem";
  const std::string cert_path = path + ".crt";

  std::error_code error;
  const bool key_exists = std::filesystem::exists(key_path, error);
  if (error) {
    return FileError(error.value(),
                     absl::StrCat("failed to check identity file ", key_path));
  }
  const bool cert_exists = std::filesystem::exists(cert_path, error);
  if (error) {
    return FileError(error.value(),
                     absl::StrCat("failed to check identity file ", cert_path));
  }

  if (key_exists && cert_exists) {
    POLLEN_ASSIGN_OR_RETURN(dht::crypto::Identity identity,
                            LoadIdentity(key_path, cert_path));
    POLLEN_LOG_INFO("Loaded identity {} (node id {})", path,
                    NodeIdOf(identity));
    return identity;
  }
  if (key_exists != cert_exists) {
    const std::string& present = key_exists ? key_path : cert_path;
    const std::string& missing = key_exists ? cert_path : key_path;
    return absl::FailedPreconditionError(
        absl::StrCat("identity ", path, " is incomplete: ", present,
                     " exists but ", missing, " is missing; restore ", missing,
                     " or delete ", present, " to create a new identity"));
  }

  const std::filesystem::path parent =
      std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::filesystem::create_directories(parent, error);
    if (error) {
      return FileError(
          error.value(),
          absl::StrCat("failed to create identity folder ", parent.string()));
    }
  }

  POLLEN_ASSIGN_OR_RETURN(dht::crypto::Identity identity,
                          GenerateIdentity(name));
  POLLEN_RETURN_IF_ERROR(SaveIdentity(identity, key_path, cert_path));
  POLLEN_LOG_INFO("Created identity {} and {} (node id {})", key_path,
                  cert_path, NodeIdOf(identity));
  return identity;
}

absl::StatusOr<dht::crypto::Identity> CreateEphemeralIdentity(
    const std::string& name) {
  return GenerateIdentity(name);
}

std::string NodeIdOf(const dht::crypto::Identity& identity) {
  if (identity.first) return identity.first->getPublicKey().getId().toString();
  if (identity.second) return identity.second->getId().toString();
  return "";
}

}  // namespace pollen
