// `pollen eval`: accuracy of a block precision against float32 on a text.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "client/quality_eval.h"
#include "common/dtype.h"

namespace pollen::cli {
namespace {

nlohmann::json ReportToJson(const client::QualityReport& report,
                            const EvalCommandOptions& options) {
  return {{"dtype", DtypeName(*ParseDtype(options.dtype))},
          {"quantization", options.quantization},
          {"tokens", report.tokens},
          {"predictions", report.predictions},
          {"top1_agreement", report.top1_agreement},
          {"perplexity_reference", report.perplexity_reference},
          {"perplexity", report.perplexity},
          {"perplexity_change", report.perplexity_change},
          {"max_abs_logit_diff", report.max_abs_logit_diff},
          {"mean_abs_logit_diff", report.mean_abs_logit_diff},
          {"weight_bytes_reference", report.weight_bytes_reference},
          {"weight_bytes", report.weight_bytes},
          {"prefill_tokens_per_s_reference",
           report.prefill_tokens_per_s_reference},
          {"prefill_tokens_per_s", report.prefill_tokens_per_s}};
}

void PrintTable(const client::QualityReport& report,
                const EvalCommandOptions& options) {
  const std::string name = absl::StrFormat(
      "%s%s", DtypeName(*ParseDtype(options.dtype)),
      options.quantization == "none" ? "" : " + " + options.quantization);
  std::cout << absl::StrFormat(
      "%-20s %d (%d next-token predictions)\n"
      "%-20s %.4f\n"
      "%-20s float32 %.4f, %s %.4f (%+.2f%%)\n"
      "%-20s max %.4g, mean %.4g\n"
      "%-20s float32 %d, %s %d (%.3fx)\n"
      "%-20s float32 %.1f, %s %.1f\n",
      "tokens", report.tokens, report.predictions,  //
      "top-1 agreement", report.top1_agreement,     //
      "perplexity", report.perplexity_reference, name, report.perplexity,
      100 * report.perplexity_change,  //
      "logit difference", report.max_abs_logit_diff,
      report.mean_abs_logit_diff,  //
      "block weight bytes", report.weight_bytes_reference, name,
      report.weight_bytes,
      static_cast<double>(report.weight_bytes) /
          static_cast<double>(report.weight_bytes_reference),  //
      "prefill tokens/s", report.prefill_tokens_per_s_reference, name,
      report.prefill_tokens_per_s);
}

}  // namespace

int RunEvalCommand(const EvalCommandOptions& options) {
  // Flags first, so that a typo fails before any weight loads.
  const absl::StatusOr<at::ScalarType> dtype = ParseDtype(options.dtype);
  if (!dtype.ok()) {
    std::cerr << "error: --dtype: " << dtype.status().message() << "\n";
    return 2;
  }
  const absl::StatusOr<node::Quantization> quantization =
      node::ParseQuantization(options.quantization);
  if (!quantization.ok()) {
    std::cerr << "error: --quantize: " << quantization.status().message()
              << "\n";
    return 2;
  }
  client::BlockPrecision precision;
  precision.dtype = *dtype;
  precision.quantization = *quantization;
  try {
    precision.device = at::Device(options.device);
  } catch (const c10::Error&) {
    std::cerr << "error: --device: unknown device '" << options.device
              << "'; use cpu, cuda or cuda:N\n";
    return 2;
  }
  if (options.text_path.empty()) {
    std::cerr << "error: pollen eval needs --text FILE, the text to score\n";
    return 2;
  }
  std::ifstream file(options.text_path);
  if (!file) {
    std::cerr << "error: cannot read --text file " << options.text_path
              << "\n";
    return 2;
  }
  std::stringstream text;
  text << file.rdbuf();

  const absl::StatusOr<client::QualityReport> report =
      client::CompareBlockPrecisionOnText(options.model_dir, text.str(),
                                          precision);
  if (!report.ok()) {
    std::cerr << "error: " << report.status().message() << "\n";
    return 1;
  }
  if (options.json) {
    std::cout << ReportToJson(*report, options).dump() << "\n";
  } else {
    PrintTable(*report, options);
  }
  return 0;
}

}  // namespace pollen::cli
