// The `pollen` command: one binary for nodes, clients and local swarms.
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/cli/child_process.h"
#include "client/cli/commands.h"
#include "client/cli/flag_parsing.h"
#include "client/tokenizer.h"
#include "common/activation_compression.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/model_config.h"
#include "common/peer_address.h"
#include "node/quantized_linear.h"

// Model and swarm.
ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint folder (config.json, safetensors, tokenizer.model)");
ABSL_FLAG(std::string, model_id, "", "Model id announced in the DHT; defaults to the model folder's name");
ABSL_FLAG(std::string, initial_peers, "", "Comma-separated HOST:PORT DHT addresses of swarm members to join through");

// pollen node.
ABSL_FLAG(std::string, blocks, "", "Blocks to serve as START:END (END excluded), e.g. 0:16; without it the node chooses where its blocks help the swarm most");
ABSL_FLAG(int, num_blocks, 0, "Number of blocks the node chooses to serve when --blocks is absent; 0 means as many as fit in free memory");
ABSL_FLAG(double, throughput, 0, "Decode steps/s through one block to announce instead of measuring; 0 measures at start (or reads --throughput-cache)");
ABSL_FLAG(std::string, throughput_cache, "", "JSON file that keeps throughput measurements across starts; default ~/.cache/pollen/throughput.json");
ABSL_FLAG(int, rebalance_period_s, 300, "Seconds between checks whether other blocks would serve the swarm better; 0 disables rebalancing");
ABSL_FLAG(double, min_balance_gain, 1.25, "A rebalance moves only when the swarm's slowest block gets at least this many times faster");
ABSL_FLAG(int, drain_timeout_s, 30, "Seconds sessions may go on after SIGTERM or a move before they are cancelled");
ABSL_FLAG(int, port, 0, "TCP port of the node's gRPC server; 0 picks a free port");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address the node's gRPC server listens on");
ABSL_FLAG(std::string, announce_host, "127.0.0.1", "Host name or IP that clients use to reach this node; announced in the DHT");
ABSL_FLAG(int, dht_port, 0, "UDP port of the node's DHT participant; 0 picks a free port");
ABSL_FLAG(std::string, identity, "", "Path of the node's signing identity: PATH.pem holds the key and PATH.crt the certificate, created on first start; empty uses a new one each start");
ABSL_FLAG(int64_t, cache_tokens, 16384, "KV cache budget in tokens (batch x positions) across all sessions");
ABSL_FLAG(int64_t, prefill_chunk, 512, "Most tokens (batch x new tokens, over all sessions) in one forward pass of a node; longer prompts run in chunks of this size");
ABSL_FLAG(std::string, public_name, "", "Name shown in `pollen status`; defaults to the node's address");
ABSL_FLAG(std::string, dtype, "float32", "Dtype that blocks compute and keep their KV cache in, and their weights without --quantize: float32, float16 or bfloat16 (fp32, fp16, bf16); make-checkpoint: the dtype of the written tensors");
ABSL_FLAG(std::string, device, "cpu", "libtorch device: cpu, cuda or cuda:N");
ABSL_FLAG(std::string, quantize, "none", "node, eval, local-swarm: none, or int8 to store the blocks' linear weights as int8 with one scale per output channel (about a quarter of the float32 bytes); compute stays in --dtype");
ABSL_FLAG(std::string, text, "", "eval: text file to score the model on");
ABSL_FLAG(int, threads, 0, "Intra-op threads for libtorch (bench: in its own process and every node); 0 keeps libtorch's default");
ABSL_FLAG(int, session_idle_timeout_s, 300, "Seconds without a step after which a session's cache is freed");
ABSL_FLAG(int, announce_period_s, 30, "Seconds between DHT announcements");
ABSL_FLAG(int, record_ttl_s, 90, "Seconds an announcement stays valid; must exceed --announce_period_s");

// Generation.
ABSL_FLAG(std::string, prompt, "", "Text to continue");
ABSL_FLAG(std::string, prompts_file, "", "generate: a file with one prompt per line (blank lines skipped, up to 256) to continue in one batch, whose steps travel together; prints each prompt and its continuation in the file's order, each ending in a newline (continuations may contain newlines; --json prints one object per line)");
ABSL_FLAG(int, max_new_tokens, 32, "Maximum number of tokens to generate (per turn in chat)");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature; 0 means greedy");
ABSL_FLAG(int, top_k, 0, "Sample among the K most likely tokens; 0 disables");
ABSL_FLAG(double, top_p, 1.0, "Sample among the most likely tokens whose probabilities sum to P; 1 disables");
ABSL_FLAG(double, repetition_penalty, 1.0, "Penalty for tokens already in the context; 1 disables");
ABSL_FLAG(uint64_t, seed, 0, "Random seed. generate, chat and local-swarm sample with it, and with 0 and a --temperature above 0 draw one and print it on stderr. A node seeds its span choice and rebalancing with it, and draws a random seed when it is 0. make-checkpoint seeds the weights with it");
ABSL_FLAG(int, max_length, 0, "chat: tokens the whole conversation may use; 0 means the model's maximum");
ABSL_FLAG(int, discovery_wait_s, 30, "Seconds to wait for nodes covering every block");
ABSL_FLAG(int, step_timeout_s, 60, "Seconds one step through one node may take");
ABSL_FLAG(bool, push, false, "generate, chat, local-swarm, bench: each node sends its step output straight to the next node, and only the last node replies to the client; saves a trip through the client per node and keeps concurrent sessions batched along the route");
ABSL_FLAG(bool, json, false, "Print JSON instead of text");
ABSL_FLAG(std::string, adapter, "", "generate, chat, local-swarm: adapter folder written by `pollen finetune` to run the model with");
ABSL_FLAG(std::string, compression, "none", "generate, chat, local-swarm, finetune, bench: encoding of hidden states (and gradients) between client and nodes: none (float32), fp16, bf16 or int8 (blockwise, one scale per 64 values); the lossy ones send fewer bytes and may change the output");

// pollen local-swarm.
ABSL_FLAG(int, nodes, 2, "local-swarm, bench: number of node processes");
ABSL_FLAG(std::string, work_dir, "", "local-swarm: folder for node logs and identities; default a temporary one");

// pollen finetune.
ABSL_FLAG(std::string, data, "", "finetune: training examples, a .txt file (one a line) or .jsonl file ({\"text\": ...} a line)");
ABSL_FLAG(std::string, method, "prompt", "finetune: prompt, deep-prompt or lora");
ABSL_FLAG(int64_t, steps, 100, "finetune: number of optimizer steps");
ABSL_FLAG(int, batch_size, 4, "finetune: examples per step");
ABSL_FLAG(int, seq_len, 128, "finetune: tokens per example (BOS included); longer examples are cut");
ABSL_FLAG(double, lr, 1e-3, "finetune: Adam learning rate");
ABSL_FLAG(std::string, output, "", "finetune: folder for the adapter (adapter_model.safetensors, adapter_config.json)");
ABSL_FLAG(bool, local, false, "finetune: run every block in this process instead of through the swarm");
ABSL_FLAG(std::string, loss_log, "", "finetune: CSV file with one step,loss,tokens_per_s row per step");
ABSL_FLAG(bool, resume, false, "finetune: continue from the adapter and optimizer state in --output");
ABSL_FLAG(int, lora_rank, 8, "finetune: LoRA rank r");
ABSL_FLAG(double, lora_alpha, 16, "finetune: LoRA alpha; updates are scaled by alpha / r");
ABSL_FLAG(std::string, lora_targets, "q_proj,v_proj", "finetune: comma-separated projections LoRA adapts, among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj");
ABSL_FLAG(bool, train_head, false, "finetune: also train the final norm and LM head on this machine (saved in the adapter)");
ABSL_FLAG(int, prefix_length, 16, "finetune: trainable positions of prompt and deep-prompt tuning");

// pollen make-checkpoint.
ABSL_FLAG(std::string, shape, "", "make-checkpoint: model shape: tinyllama-1.1b, llama2-7b, llama2-70b, or test-tiny (a few hundred KB, for tests)");
ABSL_FLAG(int, layers, 0, "make-checkpoint: number of blocks (num_hidden_layers); 0 keeps the shape's own");
ABSL_FLAG(std::string, out, "", "make-checkpoint: folder to write the checkpoint to; must not exist or be empty");

// pollen bench.
ABSL_FLAG(int, sessions, 8, "bench: sessions decoding at once through the swarm for the aggregate tokens/s");
ABSL_FLAG(int, prompt_tokens, 32, "bench: tokens in the prompt, run in one prefill step");
ABSL_FLAG(int, new_tokens, 32, "bench: decode steps after the prompt, one token each");
ABSL_FLAG(int, repetitions, 3, "bench: timed runs per measurement after one warm-up; the median is reported");

ABSL_FLAG(std::string, log_level, "", "Log level: trace, debug, info, warn, error; default info for node, warn for other commands");

namespace {

constexpr char kUsage[] = R"(run large language models across a swarm of machines.

Usage: pollen COMMAND [--flags]

Commands:
  node         serve blocks of a model to the swarm
                 pollen node --model DIR [--blocks A:B | --num-blocks N] --port P [--initial-peers HOST:PORT]
  generate     generate text through the swarm
                 pollen generate --model DIR --initial-peers HOST:PORT --prompt TEXT [--adapter DIR]
                 pollen generate --model DIR --initial-peers HOST:PORT --prompts-file FILE
  chat         one user turn per input line, in one session
  status       show what the swarm serves, block by block
                 pollen status --initial-peers HOST:PORT [--json]
  local-swarm  start N nodes on this machine, generate, and stop
                 pollen local-swarm --model DIR --nodes N --prompt TEXT
  finetune     train a prompt, deep prompt or LoRA adapter
                 pollen finetune --model DIR --data FILE --method lora --output DIR --local
  eval         compare a block dtype and quantization against float32 on a text
                 pollen eval --model DIR --text FILE --dtype bf16 --quantize int8 [--json]
  make-checkpoint  write a checkpoint with a real model's shapes and random weights
                 pollen make-checkpoint --shape tinyllama-1.1b --dtype fp32 --out DIR [--layers N] [--seed S]
  bench        measure decode and prefill tokens/s locally and through N local nodes
                 pollen bench --model DIR --nodes N --sessions S --prompt-tokens P --new-tokens T [--json]

Flags use dashes or underscores: --max-new-tokens and --max_new_tokens are the same.)";

std::vector<std::string> SplitPeers(const std::string& peers) {
  return absl::StrSplit(peers, ',', absl::SkipWhitespace());
}

bool ParseBlocks(const std::string& text, int* start, int* end) {
  const std::vector<std::string> parts = absl::StrSplit(text, ':');
  return parts.size() == 2 && absl::SimpleAtoi(parts[0], start) &&
         absl::SimpleAtoi(parts[1], end);
}

pollen::cli::GenerateCommandOptions GenerateOptionsFromFlags() {
  pollen::cli::GenerateCommandOptions options;
  options.client.model_dir = absl::GetFlag(FLAGS_model);
  options.client.model_id = absl::GetFlag(FLAGS_model_id);
  options.client.initial_peers = SplitPeers(absl::GetFlag(FLAGS_initial_peers));
  options.client.discovery_wait = absl::Seconds(absl::GetFlag(FLAGS_discovery_wait_s));
  options.client.step_timeout = absl::Seconds(absl::GetFlag(FLAGS_step_timeout_s));
  options.client.adapter_dir = absl::GetFlag(FLAGS_adapter);
  options.client.push = absl::GetFlag(FLAGS_push);
  options.client.compression = absl::GetFlag(FLAGS_compression);
  options.prompt = absl::GetFlag(FLAGS_prompt);
  options.prompts_file = absl::GetFlag(FLAGS_prompts_file);
  options.generation.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  options.generation.sampling.temperature =
      static_cast<float>(absl::GetFlag(FLAGS_temperature));
  options.generation.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  options.generation.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  options.generation.sampling.repetition_penalty =
      static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  options.generation.sampling.seed = absl::GetFlag(FLAGS_seed);
  options.json = absl::GetFlag(FLAGS_json);
  options.max_length = absl::GetFlag(FLAGS_max_length);
  return options;
}

// Runs `pollen node` for the model whose config.json is `config`.
// Returns whether --dtype and --quantize name known values, and prints
// the error when one does not.
bool PrecisionFlagsValid() {
  const auto dtype = pollen::ParseDtype(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) {
    std::cerr << "error: --dtype: " << dtype.status().message() << "\n";
    return false;
  }
  const auto quantization =
      pollen::node::ParseQuantization(absl::GetFlag(FLAGS_quantize));
  if (!quantization.ok()) {
    std::cerr << "error: --quantize: " << quantization.status().message()
              << "\n";
    return false;
  }
  return true;
}

int RunNode(const pollen::ModelConfig& config) {
  pollen::node::NodeOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.model_id = absl::GetFlag(FLAGS_model_id);

  // Span: given, or chosen by the node.
  const std::string blocks = absl::GetFlag(FLAGS_blocks);
  if (!blocks.empty() &&
      (!ParseBlocks(blocks, &options.block_start, &options.block_end) ||
       options.block_start < 0 || options.block_start >= options.block_end)) {
    std::cerr << "error: --blocks must be START:END with 0 <= START < END, "
                 "e.g. 0:16; got '"
              << blocks << "'\n";
    return 2;
  }
  options.num_blocks = absl::GetFlag(FLAGS_num_blocks);
  if (!blocks.empty() && options.num_blocks != 0 &&
      options.num_blocks != options.block_end - options.block_start) {
    std::cerr << "error: --num-blocks " << options.num_blocks
              << " contradicts --blocks " << blocks << " ("
              << options.block_end - options.block_start
              << " blocks); give only one of them\n";
    return 2;
  }
  options.seed = absl::GetFlag(FLAGS_seed);

  // Throughput and moves.
  options.throughput = absl::GetFlag(FLAGS_throughput);
  options.throughput_cache_path = absl::GetFlag(FLAGS_throughput_cache);
  options.rebalance_period =
      absl::Seconds(absl::GetFlag(FLAGS_rebalance_period_s));
  options.min_balance_gain = absl::GetFlag(FLAGS_min_balance_gain);
  options.drain_timeout = absl::Seconds(absl::GetFlag(FLAGS_drain_timeout_s));

  // Network, identity and resources.
  options.listen_host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.announce_host = absl::GetFlag(FLAGS_announce_host);
  options.dht_port = absl::GetFlag(FLAGS_dht_port);
  options.initial_peers = SplitPeers(absl::GetFlag(FLAGS_initial_peers));
  options.identity_path = absl::GetFlag(FLAGS_identity);
  options.public_name = absl::GetFlag(FLAGS_public_name);
  options.cache_tokens = absl::GetFlag(FLAGS_cache_tokens);
  options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  options.dtype = absl::GetFlag(FLAGS_dtype);
  options.quantization = absl::GetFlag(FLAGS_quantize);
  options.device = absl::GetFlag(FLAGS_device);
  options.threads = absl::GetFlag(FLAGS_threads);
  if (!PrecisionFlagsValid()) return 2;
  options.session_idle_timeout =
      absl::Seconds(absl::GetFlag(FLAGS_session_idle_timeout_s));
  options.announce_period = absl::Seconds(absl::GetFlag(FLAGS_announce_period_s));
  options.record_ttl = absl::Seconds(absl::GetFlag(FLAGS_record_ttl_s));

  // Values that cannot work exit with code 2 before the node loads.
  const absl::Status valid = pollen::node::ValidateNodeOptions(options);
  if (!valid.ok()) {
    std::cerr << "error: " << valid.message() << "\n";
    return 2;
  }
  const int64_t model_blocks = config.num_hidden_layers;
  if (!blocks.empty() && options.block_end > model_blocks) {
    std::cerr << "error: --blocks " << blocks << " ends past the "
              << model_blocks << " blocks of " << options.model_dir
              << "; END must be at most " << model_blocks << "\n";
    return 2;
  }
  if (options.num_blocks > model_blocks) {
    std::cerr << "error: --num-blocks " << options.num_blocks
              << " exceeds the " << model_blocks << " blocks of "
              << options.model_dir << "\n";
    return 2;
  }
  return pollen::cli::RunNodeCommand(options);
}

// Warns on stderr when --push is set where it changes nothing: on a command
// that never pushes, or on a local swarm of one node, which has no next
// node to push to.
void WarnIfPushHasNoEffect(const std::string& command) {
  if (!absl::GetFlag(FLAGS_push)) return;
  const bool pushes = command == "generate" || command == "chat" ||
                      command == "local-swarm" || command == "bench";
  if (!pushes) {
    std::cerr << "warning: --push has no effect on pollen " << command
              << "; it applies to generate, chat, local-swarm and bench\n";
    return;
  }
  const bool starts_nodes = command == "local-swarm" || command == "bench";
  if (starts_nodes && absl::GetFlag(FLAGS_nodes) == 1) {
    std::cerr << "warning: --push has no effect with --nodes 1: a single "
                 "node has no next node to push to\n";
  }
}

int RunFinetune() {
  pollen::cli::FinetuneCommandOptions options;
  options.client = GenerateOptionsFromFlags().client;
  pollen::client::FinetuneOptions& finetune = options.finetune;
  finetune.model_dir = absl::GetFlag(FLAGS_model);
  finetune.data_path = absl::GetFlag(FLAGS_data);
  auto method = pollen::client::ParseAdapterMethod(absl::GetFlag(FLAGS_method));
  if (!method.ok()) {
    std::cerr << "error: --method: " << method.status().message() << "\n";
    return 2;
  }

  // Method and its sizes.
  finetune.adapter.method = *method;
  finetune.adapter.prefix_length = absl::GetFlag(FLAGS_prefix_length);
  finetune.adapter.train_head = absl::GetFlag(FLAGS_train_head);
  finetune.adapter.lora_rank = absl::GetFlag(FLAGS_lora_rank);
  finetune.adapter.lora_alpha = static_cast<float>(absl::GetFlag(FLAGS_lora_alpha));
  finetune.adapter.lora_targets = SplitPeers(absl::GetFlag(FLAGS_lora_targets));

  // Optimisation, output and swarm.
  finetune.steps = absl::GetFlag(FLAGS_steps);
  finetune.batch_size = absl::GetFlag(FLAGS_batch_size);
  finetune.seq_len = absl::GetFlag(FLAGS_seq_len);
  finetune.learning_rate = absl::GetFlag(FLAGS_lr);
  finetune.output_dir = absl::GetFlag(FLAGS_output);
  finetune.seed = absl::GetFlag(FLAGS_seed);
  finetune.local = absl::GetFlag(FLAGS_local);
  finetune.initial_peers = options.client.initial_peers;
  finetune.model_id = options.client.model_id;
  finetune.discovery_wait = options.client.discovery_wait;
  finetune.compression = options.client.compression;
  finetune.loss_log_path = absl::GetFlag(FLAGS_loss_log);
  finetune.resume = absl::GetFlag(FLAGS_resume);
  if (finetune.data_path.empty() || finetune.output_dir.empty()) {
    std::cerr << "error: pollen finetune needs --data FILE and --output DIR\n";
    return 2;
  }
  if (!finetune.local && options.client.initial_peers.empty()) {
    std::cerr << "error: pollen finetune needs --initial-peers HOST:PORT, "
                 "or --local to run every block in this process\n";
    return 2;
  }
  return pollen::cli::RunFinetuneCommand(options);
}

}  // namespace

int main(int argc, char** argv) {
  // The deadlock detector keeps a global graph of lock orders, which costs
  // every lock a trip through one global mutex. The tests keep it on.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  absl::SetProgramUsageMessage(kUsage);
  std::vector<std::string> storage;
  std::vector<char*> normalized =
      pollen::cli::NormalizeFlagNames(argc, argv, storage);
  if (pollen::cli::IsHelpRequest(normalized)) {
    pollen::cli::PrintHelp(std::cout, kUsage, "cli/main.cc");
    return 0;
  }
  const std::string flag_error = pollen::cli::FindFlagError(normalized);
  if (!flag_error.empty()) {
    std::cerr << "error: " << flag_error << "\n";
    return 2;
  }
  const std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(normalized.size()), normalized.data());
  if (positional.size() > 2) {
    std::cerr << "error: unexpected argument '" << positional[2]
              << "' after the command '" << positional[1]
              << "'; every value goes with a flag, e.g. --prompt \"...\"\n";
    return 2;
  }
  if (positional.size() != 2) {
    std::cerr << "pollen: " << kUsage << "\n";
    return 2;
  }
  const std::string command = positional[1];

  // Client commands print their results on stdout; keep stderr quiet
  // unless asked.
  pollen::InitLogging(command == "node" ? "node" : "pollen");
  std::string log_level = absl::GetFlag(FLAGS_log_level);
  if (log_level.empty() && std::getenv("POLLEN_LOG_LEVEL") == nullptr) {
    log_level = command == "node" ? "info" : "warn";
  }
  if (!log_level.empty() && !pollen::SetLogLevel(log_level)) {
    std::cerr << "error: unknown --log-level '" << log_level << "'\n";
    return 2;
  }

  const bool needs_model = command == "node" || command == "generate" ||
                           command == "chat" || command == "local-swarm" ||
                           command == "finetune" || command == "bench" ||
                           command == "eval";
  if (needs_model && absl::GetFlag(FLAGS_model).empty()) {
    std::cerr << "error: pollen " << command << " needs --model DIR\n";
    return 2;
  }
  pollen::ModelConfig model_config;
  if (needs_model) {
    const auto config = pollen::LoadModelConfig(absl::GetFlag(FLAGS_model));
    if (!config.ok()) {
      std::cerr << "error: --model " << absl::GetFlag(FLAGS_model) << ": "
                << config.status().message() << "\n";
      return 2;
    }
    model_config = *config;
  }
  const bool uses_compression = command == "generate" || command == "chat" ||
                                command == "local-swarm" ||
                                command == "finetune" || command == "bench";
  if (uses_compression) {
    const auto compression =
        pollen::ParseCompression(absl::GetFlag(FLAGS_compression));
    if (!compression.ok()) {
      std::cerr << "error: --compression: " << compression.status().message()
                << "\n";
      return 2;
    }
  }
  const bool needs_peers =
      command == "generate" || command == "chat" || command == "status";
  if (needs_peers && absl::GetFlag(FLAGS_initial_peers).empty()) {
    std::cerr << "error: pollen " << command
              << " needs --initial-peers HOST:PORT of a swarm member\n";
    return 2;
  }

  // Invalid values exit with code 2 here, like the flag errors above,
  // instead of failing after the wait for the swarm.
  const bool generates = command == "generate" || command == "chat" ||
                         command == "local-swarm";
  const bool takes_prompt = command == "generate" || command == "local-swarm";
  if (generates) {
    const pollen::cli::GenerateCommandOptions options = GenerateOptionsFromFlags();
    const absl::Status valid_waits = pollen::ValidateClientWaits(options.client);
    if (!valid_waits.ok()) {
      std::cerr << "error: " << valid_waits.message() << "\n";
      return 2;
    }
    const absl::Status valid = pollen::ValidateGenerationOptions(options.generation);
    if (!valid.ok()) {
      // The message starts with the field's name, which is the flag's.
      std::string message(valid.message());
      const size_t name_end = std::min(message.find(' '), message.size());
      std::replace(message.begin(), message.begin() + name_end, '_', '-');
      std::cerr << "error: --" << message << "\n";
      return 2;
    }
    const int64_t positions = model_config.max_position_embeddings;
    if (command == "chat" && options.max_length != 0 &&
        (options.max_length < 2 || options.max_length > positions)) {
      std::cerr << "error: --max-length " << options.max_length
                << " is outside 2.." << positions
                << " (the model's positions; 0 uses them all)\n";
      return 2;
    }
    if (options.generation.max_new_tokens >= model_config.max_position_embeddings) {
      std::cerr << "error: --max-new-tokens " << options.generation.max_new_tokens
                << " leaves no room for a prompt in the model's "
                << model_config.max_position_embeddings << " positions\n";
      return 2;
    }

    // A file of prompts replaces --prompt, for generate only.
    std::vector<std::pair<std::string, std::string>> prompts = {
        {"--prompt", options.prompt}};
    if (!options.prompts_file.empty()) {
      if (command != "generate") {
        std::cerr << "error: --prompts-file applies to generate only\n";
        return 2;
      }
      if (!options.prompt.empty()) {
        std::cerr << "error: give --prompt or --prompts-file, not both\n";
        return 2;
      }
      auto lines = pollen::cli::ReadPromptsFile(options.prompts_file);
      if (!lines.ok()) {
        std::cerr << "error: " << lines.status().message() << "\n";
        return 2;
      }
      prompts.clear();
      for (const pollen::cli::PromptLine& line : *lines) {
        prompts.emplace_back(
            absl::StrCat("line ", line.line, " of --prompts-file"), line.text);
      }
    }

    // The prompt's tokens count too. The library checks again with an
    // adapter's prompt positions, which are known only once it loads.
    if (takes_prompt) {
      auto tokenizer = pollen::client::Tokenizer::Load(
          options.client.model_dir + "/tokenizer.model");
      for (const auto& [name, prompt] : prompts) {
        if (!tokenizer.ok()) break;
        const int64_t prompt_tokens = static_cast<int64_t>(
            (*tokenizer)->Encode(prompt, /*add_bos=*/true).size());
        if (prompt_tokens >= positions) {
          std::cerr << "error: the " << prompt_tokens << " tokens of " << name
                    << " leave no room for a new token in the model's "
                    << positions << " positions; shorten it\n";
          return 2;
        }
        if (prompt_tokens + options.generation.max_new_tokens > positions) {
          std::cerr << "error: --max-new-tokens "
                    << options.generation.max_new_tokens << " plus the "
                    << prompt_tokens << " tokens of " << name
                    << " exceeds the model's " << positions
                    << " positions; at most " << positions - prompt_tokens
                    << " new tokens fit\n";
          return 2;
        }
      }
    }
  }
  if (!generates && !absl::GetFlag(FLAGS_prompts_file).empty()) {
    std::cerr << "error: --prompts-file applies to generate only\n";
    return 2;
  }
  const bool joins_swarm = needs_peers || command == "node" || command == "finetune";
  if (joins_swarm) {
    for (const std::string& peer : SplitPeers(absl::GetFlag(FLAGS_initial_peers))) {
      const absl::Status valid = pollen::ResolvePeerHost(peer);
      if (!valid.ok()) {
        std::cerr << "error: --initial-peers: " << valid.message() << "\n";
        return 2;
      }
    }
  }

  // The bench warns after it restarted itself, so that the warning shows
  // once.
  if (command != "bench") WarnIfPushHasNoEffect(command);
  if (takes_prompt && absl::GetFlag(FLAGS_prompt).empty() &&
      absl::GetFlag(FLAGS_prompts_file).empty()) {
    std::cerr << "note: no --prompt given; generating from the "
                 "beginning-of-sequence token alone\n";
  }

  // Sampling without --seed draws a seed so that two runs differ, and the
  // note gives the seed that repeats a run.
  if (generates && absl::GetFlag(FLAGS_seed) == 0 &&
      absl::GetFlag(FLAGS_temperature) > 0) {
    std::random_device device;
    uint64_t seed = 0;
    while (seed == 0) seed = (uint64_t{device()} << 32) | device();
    absl::SetFlag(&FLAGS_seed, seed);
    std::cerr << "note: sampling with --seed " << seed
              << "; pass it to repeat this output\n";
  }

  if (command == "node") return RunNode(model_config);
  if (command == "make-checkpoint") {
    pollen::cli::MakeCheckpointCommandOptions options;
    options.shape = absl::GetFlag(FLAGS_shape);
    options.num_layers = absl::GetFlag(FLAGS_layers);
    options.dtype = absl::GetFlag(FLAGS_dtype);
    options.out_dir = absl::GetFlag(FLAGS_out);
    options.seed = absl::GetFlag(FLAGS_seed);
    return pollen::cli::RunMakeCheckpointCommand(options);
  }
  if (command == "bench") {
    // The bench shares the cores with its nodes, so idle OpenMP and
    // OpenBLAS threads must sleep rather than spin. The libraries read the
    // variables when they load, so the process starts again with them set;
    // the nodes inherit them.
    if (pollen::cli::SetSleepingIdleThreads()) {
      // The binary's own path keeps the process's name (ps, top) `pollen`.
      const std::string self = pollen::cli::SelfExecutablePath();
      if (!self.empty()) execv(self.c_str(), argv);
      std::cerr << "warning: could not restart with sleeping idle threads; "
                   "set OMP_WAIT_POLICY=PASSIVE and OPENBLAS_THREAD_TIMEOUT=4 "
                   "for comparable numbers\n";
    }
    WarnIfPushHasNoEffect(command);
    pollen::cli::BenchCommandOptions options;
    options.bench.model_dir = absl::GetFlag(FLAGS_model);
    options.bench.num_nodes = absl::GetFlag(FLAGS_nodes);
    options.bench.sessions = absl::GetFlag(FLAGS_sessions);
    options.bench.prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
    options.bench.new_tokens = absl::GetFlag(FLAGS_new_tokens);
    options.bench.repetitions = absl::GetFlag(FLAGS_repetitions);
    options.bench.dtype = absl::GetFlag(FLAGS_dtype);
    options.bench.threads = absl::GetFlag(FLAGS_threads);
    options.bench.push = absl::GetFlag(FLAGS_push);
    options.bench.compression = absl::GetFlag(FLAGS_compression);
    options.json = absl::GetFlag(FLAGS_json);
    return pollen::cli::RunBenchCommand(options);
  }
  if (command == "finetune") return RunFinetune();
  if (command == "eval") {
    pollen::cli::EvalCommandOptions options;
    options.model_dir = absl::GetFlag(FLAGS_model);
    options.text_path = absl::GetFlag(FLAGS_text);
    options.dtype = absl::GetFlag(FLAGS_dtype);
    options.quantization = absl::GetFlag(FLAGS_quantize);
    options.device = absl::GetFlag(FLAGS_device);
    options.json = absl::GetFlag(FLAGS_json);
    return pollen::cli::RunEvalCommand(options);
  }
  if (command == "generate") return pollen::cli::RunGenerateCommand(GenerateOptionsFromFlags());
  if (command == "chat") return pollen::cli::RunChatCommand(GenerateOptionsFromFlags());
  if (command == "status") {
    pollen::cli::StatusCommandOptions options;
    options.initial_peers = SplitPeers(absl::GetFlag(FLAGS_initial_peers));
    options.json = absl::GetFlag(FLAGS_json);
    return pollen::cli::RunStatusCommand(options);
  }
  if (command == "local-swarm") {
    // The nodes would reject these only after they started.
    if (!PrecisionFlagsValid()) return 2;
    pollen::cli::LocalSwarmCommandOptions options;
    options.generate = GenerateOptionsFromFlags();
    options.num_nodes = absl::GetFlag(FLAGS_nodes);
    options.cache_tokens = absl::GetFlag(FLAGS_cache_tokens);
    options.dtype = absl::GetFlag(FLAGS_dtype);
    options.quantize = absl::GetFlag(FLAGS_quantize);
    options.work_dir = absl::GetFlag(FLAGS_work_dir);
    return pollen::cli::RunLocalSwarmCommand(options);
  }
  std::cerr << "error: unknown command '" << command << "'\n\npollen: " << kUsage
            << "\n";
  return 2;
}
