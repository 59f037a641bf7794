// `pollen finetune`: trains an adapter and saves it in PEFT layout.
#include <atomic>
#include <csignal>
#include <iostream>

#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "client/training/trainer.h"

namespace pollen::cli {
namespace {

std::atomic<bool> g_interrupted{false};

void HandleSigint(int /*signal*/) { g_interrupted.store(true); }

std::string FormatDuration(double seconds) {
  const int64_t total = static_cast<int64_t>(seconds + 0.5);
  return absl::StrFormat("%d:%02d:%02d", total / 3600, total / 60 % 60,
                         total % 60);
}

}  // namespace

int RunFinetuneCommand(const FinetuneCommandOptions& options) {
  // SIGINT stops after the current step, and the adapter is saved.
  g_interrupted.store(false);
  struct sigaction action = {};
  action.sa_handler = HandleSigint;
  sigemptyset(&action.sa_mask);
  struct sigaction previous = {};
  sigaction(SIGINT, &action, &previous);

  const auto progress = [](const client::StepReport& report) {
    std::cerr << absl::StrFormat(
                     "\rstep %d/%d  loss %.4f  %.0f tokens/s  ETA %s   ",
                     report.step, report.total_steps, report.loss,
                     report.tokens_per_s, FormatDuration(report.eta_s))
              << std::flush;
  };
  auto result =
      client::RunFinetune(options.finetune, &g_interrupted, progress);
  sigaction(SIGINT, &previous, nullptr);
  std::cerr << "\n";

  if (!result.ok()) {
    std::cerr << "error: " << result.status().message() << "\n";
    return 1;
  }
  std::cerr << absl::StrFormat(
      "%s after step %d: loss %.4f (first step of this run %.4f); adapter "
      "saved to %s\n",
      result->interrupted ? "Interrupted" : "Finished", result->steps_done,
      result->last_loss, result->first_loss, options.finetune.output_dir);
  return result->interrupted ? 130 : 0;
}

}  // namespace pollen::cli
