// Logging for every Pollen binary and library.
//
// spdlog is the backend; code logs through the POLLEN_LOG_* macros so that
// the backend stays in this file. The level comes from SetLogLevel() or the
// POLLEN_LOG_LEVEL environment variable (trace, debug, info, warn, error).
#pragma once

#include <string_view>

#include <spdlog/spdlog.h>

namespace pollen {

// Configures the default logger: stderr, timestamps, process id, and the
// level from POLLEN_LOG_LEVEL when set. Safe to call more than once.
void InitLogging(std::string_view process_name);

// Sets the level by name; unknown names leave the level unchanged and
// return false.
bool SetLogLevel(std::string_view level);

}  // namespace pollen

#define POLLEN_LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
#define POLLEN_LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define POLLEN_LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define POLLEN_LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)
