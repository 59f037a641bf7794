// Pollen client library: generate text with a model whose blocks are served
// by a swarm of nodes.
//
// The client keeps the model's embeddings, final norm and LM head, and the
// tokenizer, all read from a local checkpoint folder (block weights are not
// read). It finds nodes through the DHT, builds a chain that covers every
// block, streams hidden states through it and samples tokens locally.
//
// Example:
//
//   pollen::ClientOptions options;
//   options.model_dir = "/models/stories260k";
//   options.initial_peers = {"127.0.0.1:31337"};
//   auto client = pollen::Client::Connect(options);
//   if (!client.ok()) return client.status();
//   pollen::GenerationOptions generation;
//   generation.max_new_tokens = 32;
//   auto result = (*client)->Generate("Once upon a time", generation,
//                                     [](const std::string& piece) {
//                                       std::cout << piece << std::flush;
//                                     });
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace pollen {

// Settings that pick the next token from the logits.
struct SamplingOptions {
  // 0 picks the most likely token (greedy); larger values flatten the
  // distribution.
  float temperature = 0;
  // Keep only the k most likely tokens; 0 keeps all.
  int top_k = 0;
  // Keep the smallest set of tokens whose probabilities sum to at least p;
  // 1 keeps all.
  float top_p = 1.0f;
  // Divides positive logits (multiplies negative ones) of tokens already in
  // the context; 1 disables it.
  float repetition_penalty = 1.0f;
  // Seed of the random draw; the same seed gives the same tokens.
  uint64_t seed = 0;
};

struct ClientOptions {
  // Hugging Face checkpoint folder with config.json, tokenizer.model and the
  // embedding, final norm and LM head tensors.
  std::string model_dir;
  // Id the nodes announce; empty means the folder name.
  std::string model_id;
  // DHT peers ("host:port") to join the swarm through.
  std::vector<std::string> initial_peers;
  // How long to wait for nodes to cover every block before failing.
  absl::Duration discovery_wait = absl::Seconds(30);
  // Deadline of one step through one node.
  absl::Duration step_timeout = absl::Seconds(60);
  // Folder of an adapter written by `pollen finetune` (adapter_config.json
  // and adapter_model.safetensors); empty runs the plain model. Prompts are
  // prepended to every sequence, and LoRA weights and deep prompts are sent
  // to the nodes once per session.
  std::string adapter_dir;
  // Server-to-server push: each node sends its output straight to the next
  // node of the route, the client sends only the first node's input, and
  // the last node replies. A node whose push fails returns its output, and
  // the client relays from there for the rest of the session. It saves a
  // trip through the client per node, and on one machine it carries
  // concurrent sessions about 60% faster (see docs/benchmarks.md).
  bool push = false;
  // Encoding of the hidden states sent to and from the nodes: "none"
  // (float32), "fp16", "bf16" or "int8" (blockwise, one float32 scale per
  // 64 values). The lossy ones send about a half (fp16, bf16) or a quarter
  // (int8) of the bytes and may change the generated tokens. Connect
  // rejects other names with INVALID_ARGUMENT.
  std::string compression = "none";
};

struct GenerationOptions {
  int max_new_tokens = 32;
  SamplingOptions sampling;
  // Stop after the model emits its end-of-sequence token.
  bool stop_at_eos = true;
};

// Returns INVALID_ARGUMENT when discovery_wait is negative or step_timeout
// is not positive. Connect runs the same check first.
absl::Status ValidateClientWaits(const ClientOptions& options);

// Returns INVALID_ARGUMENT, naming the field and its range, when a value
// of `options` is out of range. Generate and ChatSession::Send run the
// same check, so calling it first only reports the error before Connect
// waits for the swarm.
absl::Status ValidateGenerationOptions(const GenerationOptions& options);

// One node of the chain a generation ran through.
struct RouteHopInfo {
  std::string node_id;
  std::string address;
  int start = 0;  // first block
  int end = 0;    // one past the last block
};

struct GenerationResult {
  std::vector<int> prompt_ids;  // ids fed in this call (with BOS if added)
  std::vector<int> new_ids;     // generated ids, including a final EOS
  std::string text;             // decoded text of new_ids
  std::vector<RouteHopInfo> route;
  // Wall time from the first step through the swarm to the last, divided
  // by the number of new tokens. In a batch the steps are the whole
  // batch's, so it is the batch's time per token of this sequence.
  double ms_per_token = 0;
  // Why generation stopped: "eos" (the model's end-of-sequence token, with
  // stop_at_eos), "max_new_tokens", or "max_length" (a chat reached its
  // max_length before max_new_tokens).
  std::string finish_reason;
};

// Receives generated text as it arrives; pieces never split a UTF-8
// character.
using TextCallback = std::function<void(const std::string& piece)>;

// The same for GenerateBatch: `sequence` is the prompt's index.
using BatchTextCallback =
    std::function<void(int sequence, const std::string& piece)>;

// Most prompts one GenerateBatch call takes.
inline constexpr int kMaxBatchPrompts = 256;

class ChatSession;

// A connection to a swarm for one model. Thread-compatible: use one Client
// per thread, or synchronise calls.
class Client {
 public:
  // Loads the tokenizer and head weights and joins the DHT.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const ClientOptions& options);
  ~Client();

  // Generates a continuation of `prompt` (BOS is prepended).
  absl::StatusOr<GenerationResult> Generate(
      const std::string& prompt, const GenerationOptions& options,
      const TextCallback& on_text = nullptr);

  // Generates from token ids, fed as they are.
  absl::StatusOr<GenerationResult> GenerateFromIds(
      const std::vector<int>& prompt_ids, const GenerationOptions& options,
      const TextCallback& on_text = nullptr);

  // Generates a continuation of each prompt (BOS is prepended), as
  // Generate would for each alone, with the same sampling options and seed.
  // Every prompt gets a session of its own. The prompts, then each decode
  // step of all sequences, travel together, one message per node (see
  // docs/protocol.md, SessionSteps), which carries many sequences for
  // about the price of one. A sequence that stops (EOS or max_new_tokens)
  // leaves the others. Returns the results in the order of `prompts`, or
  // the first error, naming the prompt's index (from 0). INVALID_ARGUMENT for no prompts or
  // more than kMaxBatchPrompts.
  absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(
      const std::vector<std::string>& prompts, const GenerationOptions& options,
      const BatchTextCallback& on_text = nullptr);

  // The same from token ids, fed as they are.
  absl::StatusOr<std::vector<GenerationResult>> GenerateBatchFromIds(
      const std::vector<std::vector<int>>& prompts,
      const GenerationOptions& options,
      const BatchTextCallback& on_text = nullptr);

  // Opens a conversation whose turns share one session on every node, so
  // earlier turns are never sent again. `max_length` bounds the tokens of
  // the whole conversation; 0 means the model's max_position_embeddings.
  absl::StatusOr<std::unique_ptr<ChatSession>> StartChat(int max_length);

  const std::string& model_id() const;

  class Impl;

 private:
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A multi-turn conversation. Not thread-safe.
class ChatSession {
 public:
  ~ChatSession();

  // Appends the user's `text` to the conversation and generates a reply.
  absl::StatusOr<GenerationResult> Send(const std::string& text,
                                        const GenerationOptions& options,
                                        const TextCallback& on_text = nullptr);

  class Impl;

 private:
  friend class Client;
  explicit ChatSession(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pollen
