// The `pollen` subcommands. main.cc parses flags into these option structs;
// each Run*Command returns the process exit code.
#pragma once

#include <string>
#include <vector>

#include "client/bench/bench_runner.h"
#include "client/training/trainer.h"
#include "node/node_server.h"
#include "pollen/client.h"

namespace pollen::cli {

// Options shared by generate, chat and local-swarm.
struct GenerateCommandOptions {
  ClientOptions client;
  std::string prompt;
  // generate: a file of prompts, one per line, generated as one batch
  // instead of `prompt`.
  std::string prompts_file;
  GenerationOptions generation;
  // Print one JSON object (per turn for chat) instead of streamed text.
  bool json = false;
  // chat: positions the whole conversation may use; 0 means the model's
  // maximum.
  int max_length = 0;
};

struct StatusCommandOptions {
  std::vector<std::string> initial_peers;
  bool json = false;
};

struct LocalSwarmCommandOptions {
  GenerateCommandOptions generate;
  int num_nodes = 2;
  // Passed on to every node.
  int64_t cache_tokens = 16384;
  std::string dtype = "float32";
  // --quantize of every node: "none" or "int8".
  std::string quantize = "none";
  // Folder for node logs and identities; empty means a temporary folder
  // removed at exit.
  std::string work_dir;
};

struct FinetuneCommandOptions {
  // Swarm to train through when finetune.local is false.
  ClientOptions client;
  client::FinetuneOptions finetune;
};

struct EvalCommandOptions {
  std::string model_dir;
  // File whose text the model is scored on.
  std::string text_path;
  // Precision compared against float32: a ParseDtype name, a
  // ParseQuantization name and a libtorch device string.
  std::string dtype = "float32";
  std::string quantization = "none";
  std::string device = "cpu";
  // Print one JSON object instead of a table.
  bool json = false;
};

struct MakeCheckpointCommandOptions {
  // A name from bench::KnownCheckpointShapes(), e.g. tinyllama-1.1b.
  std::string shape;
  // num_hidden_layers; 0 keeps the shape's own.
  int64_t num_layers = 0;
  // float32, float16 or bfloat16 (fp32, fp16, bf16).
  std::string dtype = "float32";
  std::string out_dir;
  uint64_t seed = 0;
};

struct BenchCommandOptions {
  bench::BenchOptions bench;
  // Print one JSON object instead of a table.
  bool json = false;
};

int RunNodeCommand(const node::NodeOptions& options);
int RunGenerateCommand(const GenerateCommandOptions& options);
// One prompt of a --prompts-file and the line it is on, from 1.
struct PromptLine {
  int line = 0;
  std::string text;
};

// Returns the prompts of a --prompts-file: one per line, without a
// trailing carriage return, skipping lines that are empty or all
// whitespace. INVALID_ARGUMENT when the file cannot be read (or is a
// folder), has no prompt, or has more than kMaxBatchPrompts.
absl::StatusOr<std::vector<PromptLine>> ReadPromptsFile(const std::string& path);
int RunChatCommand(const GenerateCommandOptions& options);
int RunStatusCommand(const StatusCommandOptions& options);
int RunLocalSwarmCommand(const LocalSwarmCommandOptions& options);
// Returns 130 when SIGINT stopped training (the adapter is saved first).
int RunFinetuneCommand(const FinetuneCommandOptions& options);
int RunEvalCommand(const EvalCommandOptions& options);
int RunMakeCheckpointCommand(const MakeCheckpointCommandOptions& options);
// Returns 1 when the swarm's tokens differ from the local ones, after
// printing the results.
int RunBenchCommand(const BenchCommandOptions& options);

}  // namespace pollen::cli
