// The `pollen` subcommands. main.cc parses flags into these option structs;
// each Run*Command returns the process exit code.
#pragma once

#include <string>
#include <vector>

#include "client/training/trainer.h"
#include "node/node_server.h"
#include "pollen/client.h"

namespace pollen::cli {

// Options shared by generate, chat and local-swarm.
struct GenerateCommandOptions {
  ClientOptions client;
  std::string prompt;
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
  // Folder for node logs and identities; empty means a temporary folder
  // removed at exit.
  std::string work_dir;
};

struct FinetuneCommandOptions {
  // Swarm to train through when finetune.local is false.
  ClientOptions client;
  client::FinetuneOptions finetune;
};

int RunNodeCommand(const node::NodeOptions& options);
int RunGenerateCommand(const GenerateCommandOptions& options);
int RunChatCommand(const GenerateCommandOptions& options);
int RunStatusCommand(const StatusCommandOptions& options);
int RunLocalSwarmCommand(const LocalSwarmCommandOptions& options);
// Returns 130 when SIGINT stopped training (the adapter is saved first).
int RunFinetuneCommand(const FinetuneCommandOptions& options);

}  // namespace pollen::cli
