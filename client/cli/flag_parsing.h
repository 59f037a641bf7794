// Command-line flag handling that absl::ParseCommandLine lacks: dashed flag
// names, flag errors that exit with code 2, and a help text of Pollen's own
// flags that exits with 0.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace pollen::cli {

// Returns argv with "--max-new-tokens" style names rewritten to absl's
// "--max_new_tokens". `storage` owns the strings the result points into.
std::vector<char*> NormalizeFlagNames(int argc, char** argv,
                                      std::vector<std::string>& storage);

// Returns the first flag error of `args` (normalized, args[0] the program)
// as absl::ParseCommandLine would find it: an unknown flag, a missing
// value or a value the flag's type cannot hold. Returns "" when there is
// none. absl reports these too, but exits with code 1.
std::string FindFlagError(const std::vector<char*>& args);

// Returns true when `args` contains a help request: --help, --helpfull,
// --helpshort, -h, or "help" as the command.
bool IsHelpRequest(const std::vector<char*>& args);

// Writes `usage`, then every flag defined in a file whose path ends with
// `flags_file`, by dashed name, with its help and default value.
void PrintHelp(std::ostream& out, absl::string_view usage,
               absl::string_view flags_file);

}  // namespace pollen::cli
