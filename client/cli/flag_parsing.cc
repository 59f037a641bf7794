#include "client/cli/flag_parsing.h"

#include <algorithm>
#include <map>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace pollen::cli {
namespace {

// absl's own flags, which absl::ParseCommandLine handles itself.
bool IsAbseilFlag(absl::string_view name, bool* takes_value) {
  static const char* const kWithValue[] = {"flagfile", "fromenv", "tryfromenv",
                                           "undefok"};
  static const char* const kWithoutValue[] = {
      "help", "helpfull", "helpshort", "helppackage", "version",
      "only_check_args"};
  for (const char* flag : kWithValue) {
    if (name == flag) {
      *takes_value = true;
      return true;
    }
  }
  for (const char* flag : kWithoutValue) {
    if (name == flag) {
      *takes_value = false;
      return true;
    }
  }
  return false;
}

// "--max-new-tokens" for "max_new_tokens": the spelling the README uses.
std::string DashedFlag(absl::string_view name) {
  return absl::StrCat("--", absl::StrReplaceAll(name, {{"_", "-"}}));
}

}  // namespace

std::vector<char*> NormalizeFlagNames(int argc, char** argv,
                                      std::vector<std::string>& storage) {
  storage.assign(argv, argv + argc);
  for (std::string& arg : storage) {
    if (arg.rfind("--", 0) != 0) continue;
    const size_t name_end = std::min(arg.find('='), arg.size());
    for (size_t i = 2; i < name_end; ++i) {
      if (arg[i] == '-') arg[i] = '_';
    }
  }
  std::vector<char*> result;
  for (std::string& arg : storage) result.push_back(arg.data());
  return result;
}

std::string FindFlagError(const std::vector<char*>& args) {
  for (size_t i = 1; i < args.size(); ++i) {
    const absl::string_view arg = args[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;

    // -name, --name, -name=value or --name=value, as absl accepts them.
    const absl::string_view body = arg.substr(arg[1] == '-' ? 2 : 1);
    const size_t equals = body.find('=');
    const absl::string_view name = body.substr(0, equals);
    bool takes_value = false;
    if (IsAbseilFlag(name, &takes_value)) {
      if (takes_value && equals == absl::string_view::npos) ++i;
      continue;
    }

    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && absl::StartsWith(name, "no")) {
      absl::CommandLineFlag* negated = absl::FindCommandLineFlag(name.substr(2));
      if (negated != nullptr && negated->IsOfType<bool>()) {
        if (equals != absl::string_view::npos) {
          return absl::StrCat(DashedFlag(name), " takes no value");
        }
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::StrCat("unknown flag ", DashedFlag(name),
                          "; pollen --help lists the flags");
    }

    std::string value;
    if (equals != absl::string_view::npos) {
      value = std::string(body.substr(equals + 1));
    } else if (flag->IsOfType<bool>()) {
      continue;
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return absl::StrCat("missing value for ", DashedFlag(name));
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::StrCat("invalid value '", value, "' for ", DashedFlag(name),
                          " (default ", flag->DefaultValue(), ")");
    }
  }
  return "";
}

bool IsHelpRequest(const std::vector<char*>& args) {
  if (args.size() > 1 && absl::string_view(args[1]) == "help") return true;
  for (size_t i = 1; i < args.size(); ++i) {
    const absl::string_view arg = args[i];
    if (arg == "--") break;
    if (arg == "--help" || arg == "-help" || arg == "--helpfull" ||
        arg == "-helpfull" || arg == "--helpshort" || arg == "-helpshort" ||
        arg == "-h") {
      return true;
    }
  }
  return false;
}

void PrintHelp(std::ostream& out, absl::string_view usage,
               absl::string_view flags_file) {
  out << "pollen: " << usage << "\n\nFlags:\n";
  std::map<std::string, absl::CommandLineFlag*> sorted;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (absl::EndsWith(flag->Filename(), flags_file)) {
      sorted[std::string(name)] = flag;
    }
  }
  for (const auto& [name, flag] : sorted) {
    out << "  " << DashedFlag(name) << "  " << flag->Help() << " (default: '"
        << flag->DefaultValue() << "')\n";
  }
}

}  // namespace pollen::cli
