// Node identities: the RSA key pair and self-signed certificate that sign a
// node's DHT records.
//
// A node id is the 20-byte public key fingerprint that OpenDHT's
// PublicKey::getId() computes, written as 40 lowercase hex characters. Records
// carry it in NodeRecord.node_id, and clients compare it with the signer of the
// value.
#pragma once

#include <string>

#include <opendht/crypto.h>

#include "absl/status/statusor.h"

namespace pollen {

// Loads the identity saved at `path` (OpenDHT's saveIdentity layout: the
// private key in path.pem, the certificate in path.crt), or creates one (RSA
// 2048, self-signed, certificate name `name`) and saves it there when neither
// file exists. Creates parent folders, and the key file is readable by the
// owner only.
//
// Errors name the file. INVALID_ARGUMENT: the path is empty.
// FAILED_PRECONDITION: only one of the two files exists. DATA_LOSS: a file
// does not parse, or the certificate belongs to another key. A file that
// cannot be read or written gets the code of its errno.
absl::StatusOr<dht::crypto::Identity> LoadOrCreateIdentity(
    const std::string& path, const std::string& name);

// Creates an identity (RSA 2048, self-signed) that is not saved anywhere.
absl::StatusOr<dht::crypto::Identity> CreateEphemeralIdentity(
    const std::string& name);

// Returns the hex id of the identity's public key, the value that
// NodeRecord.node_id contains, or an empty string for an empty identity.
std::string NodeIdOf(const dht::crypto::Identity& identity);

}  // namespace pollen
