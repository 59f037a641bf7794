// `pollen generate` and `pollen chat`.
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

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
          {"ms_per_token", result.ms_per_token},
          {"finish_reason", result.finish_reason}};
}

void PrintError(const absl::Status& status) {
  std::cerr << "error: " << status.message() << "\n";
}


// Generates a continuation of every prompt of options.prompts_file as one
// batch, and prints them in the file's order once all are done: each
// prompt, its continuation and a newline, or one JSON object per line.
int RunGenerateBatch(Client& client, const GenerateCommandOptions& options) {
  auto lines = ReadPromptsFile(options.prompts_file);
  if (!lines.ok()) {
    PrintError(lines.status());
    return 1;
  }
  std::vector<std::string> prompts;
  for (const PromptLine& line : *lines) prompts.push_back(line.text);
  auto results = client.GenerateBatch(prompts, options.generation);
  if (!results.ok()) {
    PrintError(results.status());
    return 1;
  }
  for (size_t i = 0; i < results->size(); ++i) {
    if (options.json) {
      std::cout << ResultToJson((*results)[i]).dump() << "\n";
    } else {
      std::cout << prompts[i] << (*results)[i].text << "\n";
    }
  }
  return 0;
}

}  // namespace

absl::StatusOr<std::vector<PromptLine>> ReadPromptsFile(const std::string& path) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prompts-file ", path, " is a folder; give a file with one prompt "
        "per line"));
  }
  std::ifstream file(path);
  if (!file) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prompts-file ", path, ": cannot read it: ", std::strerror(errno)));
  }
  std::vector<PromptLine> prompts;
  int number = 0;
  for (std::string line; std::getline(file, line);) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const bool blank = std::all_of(line.begin(), line.end(), [](char c) {
      return std::isspace(static_cast<unsigned char>(c));
    });
    if (!blank) prompts.push_back(PromptLine{number, line});
  }
  if (prompts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prompts-file ", path, " has no prompt; write one per line"));
  }
  if (prompts.size() > static_cast<size_t>(kMaxBatchPrompts)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prompts-file ", path, " has ", prompts.size(),
        " prompts; a batch takes at most ", kMaxBatchPrompts));
  }
  return prompts;
}

int RunGenerateCommand(const GenerateCommandOptions& options) {
  auto client = Client::Connect(options.client);
  if (!client.ok()) {
    PrintError(client.status());
    return 1;
  }
  if (!options.prompts_file.empty()) return RunGenerateBatch(**client, options);

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
  const char* raise = options.max_length > 0 ? ", or raise --max-length" : "";
  bool first_turn = true;
  for (std::string line; std::getline(std::cin, line);) {
    if (line.empty()) continue;
    auto result = (*chat)->Send(line, options.generation, on_text);
    if (!result.ok()) {
      PrintError(result.status());
      if (absl::IsOutOfRange(result.status())) {
        std::cerr << (first_turn
                          ? "note: this line alone does not fit the "
                            "conversation; shorten it"
                          : "note: the conversation is full; start a new chat")
                  << raise << "\n";
      }
      return 1;
    }
    first_turn = false;
    if (options.json) {
      std::cout << ResultToJson(*result).dump() << std::endl;
    } else {
      std::cout << std::endl;
    }
    if (result->finish_reason == "max_length") {
      std::cerr << "note: the reply stopped after " << result->new_ids.size()
                << " tokens because the conversation is full; start a new chat"
                << raise << "\n";
    }
  }
  return 0;
}

}  // namespace pollen::cli
