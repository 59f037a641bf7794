// `pollen generate` and `pollen chat`.
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"

#include "client/cli/commands.h"
#include "common/logging.h"

namespace pollen::cli {
namespace {

nlohmann::json ResultToJson(const GenerationResult& result) {
  nlohmann::json route = nlohmann::json::array();
  for (const RouteHopInfo& hop : result.route) {
    route.push_back({{"node_id", hop.node_id},
                     {"address", hop.address},
                     {"blocks", {hop.start, hop.end}}});
  }
  return {{"prompt_ids", result.prompt_ids},
          {"new_ids", result.new_ids},
          {"text", result.text},
          {"route", route},
          {"ms_per_token", result.ms_per_token}};
}

void PrintError(const absl::Status& status) {
  std::cerr << "error: " << status.message() << "\n";
}

}  // namespace

int RunGenerateCommand(const GenerateCommandOptions& options) {
  auto client = Client::Connect(options.client);
  if (!client.ok()) {
    PrintError(client.status());
    return 1;
  }

  // The prompt is echoed with the first generated text, so that a request
  // that fails before generating prints nothing on stdout.
  bool prompt_printed = false;
  TextCallback on_text;
  if (!options.json) {
    on_text = [&](const std::string& piece) {
      if (!prompt_printed) std::cout << options.prompt;
      prompt_printed = true;
      std::cout << piece << std::flush;
    };
  }
  auto result = (*client)->Generate(options.prompt, options.generation, on_text);
  if (!result.ok()) {
    if (prompt_printed) std::cout << "\n";
    PrintError(result.status());
    return 1;
  }

  if (options.json) {
    std::cout << ResultToJson(*result).dump() << "\n";
  } else {
    if (!prompt_printed) std::cout << options.prompt;
    std::cout << "\n";
  }
  return 0;
}

int RunChatCommand(const GenerateCommandOptions& options) {
  auto client = Client::Connect(options.client);
  if (!client.ok()) {
    PrintError(client.status());
    return 1;
  }
  auto chat = (*client)->StartChat(options.max_length);
  if (!chat.ok()) {
    PrintError(chat.status());
    return 1;
  }

  // One turn per input line, until end of input.
  TextCallback on_text;
  if (!options.json) {
    on_text = [](const std::string& piece) { std::cout << piece << std::flush; };
  }
  for (std::string line; std::getline(std::cin, line);) {
    if (line.empty()) continue;
    auto result = (*chat)->Send(line, options.generation, on_text);
    if (!result.ok()) {
      PrintError(result.status());
      if (absl::IsOutOfRange(result.status())) {
        std::cerr << "note: the conversation is full; start a new chat"
                  << (options.max_length > 0 ? ", or raise --max-length" : "")
                  << "\n";
      }
      return 1;
    }
    if (options.json) {
      std::cout << ResultToJson(*result).dump() << std::endl;
    } else {
      std::cout << std::endl;
    }
  }
  return 0;
}

}  // namespace pollen::cli
