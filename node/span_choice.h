// Choosing the blocks a node serves: how many fit on its device, and where
// in the model they raise the swarm's weakest block the most.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "common/dht_registry.h"
#include "common/model_config.h"
#include "node/quantized_linear.h"
#include "pollen/v1/pollen.pb.h"
#include "scheduler/route.h"

namespace pollen::node {

// Bytes of one block's weights in `dtype`, computed from the config's
// shapes. With Quantization::kInt8 the linear weights take one byte per
// element plus a float32 scale per output row, and the norms stay in
// `dtype`, as LlamaBlock stores them.
int64_t BlockWeightBytes(const ModelConfig& config, at::ScalarType dtype,
                         Quantization quantization = Quantization::kNone);

// Returns the MemAvailable line of /proc/meminfo text in bytes, or
// INVALID_ARGUMENT when the text lacks it.
absl::StatusOr<int64_t> ParseMemAvailable(const std::string& meminfo);

// Bytes of memory free for new blocks on `device`: MemAvailable from
// /proc/meminfo on the CPU, the CUDA driver's free memory on a CUDA device.
// UNIMPLEMENTED for other device types, and FAILED_PRECONDITION when the
// CUDA driver cannot be asked.
absl::StatusOr<int64_t> AvailableMemoryBytes(const at::Device& device);

// Memory kept free for libtorch workspaces, gRPC messages and the rest of
// the process when the span length comes from the free memory: 1 GiB plus
// a tenth of the free memory. An estimate, not a measured bound.
int64_t MemoryReserveBytes(int64_t available_bytes);

// Returns how many blocks to serve when no span is given: `requested`
// (capped at the model's block count) when positive, otherwise as many as
// BlocksThatFit allows in the device's free memory, with weights of
// BlockWeightBytes(config, dtype, quantization), the KV cache of
// `cache_tokens` tokens in `dtype` on every block and MemoryReserveBytes
// kept free.
// Sets `reason` to a sentence for the log. RESOURCE_EXHAUSTED names the
// memory found and needed when not even one block fits, and the error of
// AvailableMemoryBytes is returned when the memory cannot be read.
absl::StatusOr<int> ChooseSpanLength(int requested, const ModelConfig& config,
                                     at::ScalarType dtype,
                                     Quantization quantization,
                                     const at::Device& device,
                                     int64_t cache_tokens, std::string* reason);

// Returns where `length` blocks of `model_id` help most: fetches the records
// of every block and passes the spans of the other nodes (records of
// `self_node_id` excluded, since they may be a previous run's) to
// scheduler::ChooseSpanStart. A failed or partial fetch leaves out the nodes
// it missed, with a warning.
absl::StatusOr<v1::BlockRange> ChooseInitialSpan(
    DhtRegistry& registry, const std::string& model_id,
    const std::string& self_node_id, int num_blocks, int length,
    double throughput, std::mt19937_64& rng);

}  // namespace pollen::node
