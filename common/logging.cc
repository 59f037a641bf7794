#include "common/logging.h"

#include <cstdlib>
#include <memory>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>

namespace pollen {

void InitLogging(std::string_view process_name) {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto logger =
      std::make_shared<spdlog::logger>(std::string(process_name), sink);
  logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%L%$ [%n %P] %v");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::info);

  if (const char* level = std::getenv("POLLEN_LOG_LEVEL")) {
    SetLogLevel(level);
  }
}

bool SetLogLevel(std::string_view level) {
  const spdlog::level::level_enum parsed =
      spdlog::level::from_str(std::string(level));
  // from_str returns `off` for names it does not know.
  if (parsed == spdlog::level::off && level != "off") return false;
  spdlog::set_level(parsed);
  return true;
}

}  // namespace pollen
