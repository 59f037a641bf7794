#include "client/training/trainer.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/swarm_client.h"
#include "client/tokenizer.h"
#include "client/training/remote_blocks.h"
#include "client/training/training_data.h"
#include "client/training/training_model.h"
#include "common/activation_compression.h"
#include "common/checkpoint.h"
#include "common/logging.h"
#include "common/model_id.h"
#include "common/status_util.h"

namespace pollen::client {
namespace {

constexpr char kStateFile[] = "trainer_state.json";
constexpr char kOptimizerFile[] = "optimizer.pt";

absl::Status ValidateOptions(const FinetuneOptions& options) {
  if (options.steps <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--steps ", options.steps, " must be positive"));
  }
  if (options.batch_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--batch-size ", options.batch_size, " must be positive"));
  }
  if (options.seq_len < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--seq-len ", options.seq_len, " must be at least 2"));
  }
  if (!(options.learning_rate > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lr ", options.learning_rate, " must be positive"));
  }
  if (options.output_dir.empty()) {
    return absl::InvalidArgumentError("fine-tuning needs --output DIR");
  }
  return absl::OkStatus();
}

// Step count stored next to the adapter, for --resume.
absl::StatusOr<int64_t> ReadDoneSteps(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / kStateFile).string();
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(
        "cannot resume: ", path, " not found; run without --resume first"));
  }
  const nlohmann::json json =
      nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.contains("step") ||
      !json["step"].is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resume: ", path, " has no integer \"step\""));
  }
  return json["step"].get<int64_t>();
}

absl::Status SaveTrainingState(const AdapterSet& adapters,
                               torch::optim::Adam& optimizer, int64_t step,
                               const std::string& dir) {
  POLLEN_RETURN_IF_ERROR(SaveAdapters(adapters, dir));
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("saving the optimizer state", [&] {
    torch::save(optimizer,
                (std::filesystem::path(dir) / kOptimizerFile).string());
    return absl::OkStatus();
  }));
  const std::string path = (std::filesystem::path(dir) / kStateFile).string();
  std::ofstream out(path);
  out << nlohmann::json{{"step", step}}.dump() << "\n";
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<FinetuneResult> RunFinetune(
    const FinetuneOptions& options, const std::atomic<bool>* stop,
    const std::function<void(const StepReport&)>& on_step) {
  POLLEN_RETURN_IF_ERROR(ValidateOptions(options));
  // Model, tokenizer and data.
  POLLEN_ASSIGN_OR_RETURN(auto checkpoint, Checkpoint::Open(options.model_dir));
  const at::Device device(at::kCPU);
  POLLEN_ASSIGN_OR_RETURN(
      auto model,
      TrainingModel::Load(*checkpoint, device, /*load_blocks=*/options.local));
  const int num_blocks =
      static_cast<int>(checkpoint->config().num_hidden_layers);

  // The swarm, unless every block runs here.
  std::unique_ptr<SwarmClient> swarm;
  std::unique_ptr<RemoteBlocks> remote;
  if (!options.local) {
    if (options.initial_peers.empty()) {
      return absl::InvalidArgumentError(
          "fine-tuning through the swarm needs --initial-peers HOST:PORT");
    }
    POLLEN_ASSIGN_OR_RETURN(swarm, SwarmClient::Connect(options.initial_peers));
    RemoteBlocksOptions remote_options;
    remote_options.model_id = options.model_id.empty()
                                  ? DefaultModelId(options.model_dir)
                                  : options.model_id;
    remote_options.num_blocks = num_blocks;
    remote_options.discovery_wait = options.discovery_wait;
    remote_options.seed = options.seed;
    POLLEN_ASSIGN_OR_RETURN(remote_options.compression,
                            ParseCompression(options.compression));
    remote = std::make_unique<RemoteBlocks>(*swarm, remote_options);
  }
  POLLEN_ASSIGN_OR_RETURN(
      auto tokenizer,
      Tokenizer::Load(
          (std::filesystem::path(options.model_dir) / "tokenizer.model")
              .string()));
  POLLEN_ASSIGN_OR_RETURN(auto examples,
                          ReadTrainingExamples(options.data_path));
  const BatchSampler sampler(*tokenizer, examples, options.batch_size,
                             options.seq_len, options.seed);

  // Adapter and optimizer: fresh, or continued from output_dir.
  torch::manual_seed(options.seed);
  AdapterSet adapters;
  int64_t done_steps = 0;
  if (options.resume) {
    POLLEN_ASSIGN_OR_RETURN(done_steps, ReadDoneSteps(options.output_dir));
    POLLEN_ASSIGN_OR_RETURN(
        adapters, LoadAdapters(options.output_dir, model->config(), device));
  } else {
    AdapterConfig config = options.adapter;
    if (config.base_model.empty()) config.base_model = options.model_dir;
    POLLEN_ASSIGN_OR_RETURN(
        adapters, InitAdapters(config, model->config(), model->embed_tokens(),
                               device));
    if (config.train_head) {
      InitTrainableHead(model->norm(), model->lm_head(), &adapters);
    }
  }
  torch::optim::Adam optimizer(
      adapters.Parameters(),
      torch::optim::AdamOptions(options.learning_rate));
  if (options.resume) {
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors("loading the optimizer state", [&] {
      torch::load(optimizer, (std::filesystem::path(options.output_dir) /
                              kOptimizerFile)
                                 .string());
      return absl::OkStatus();
    }));
  }

  // Loss log: a new file, or rows appended when resuming.
  std::ofstream loss_log;
  if (!options.loss_log_path.empty()) {
    loss_log.open(options.loss_log_path,
                  options.resume ? std::ios::app : std::ios::trunc);
    if (!loss_log) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot open loss log ", options.loss_log_path, " for writing"));
    }
    if (!options.resume) loss_log << "step,loss,tokens_per_s\n";
  }

  FinetuneResult result;
  result.steps_done = done_steps;
  const auto start = std::chrono::steady_clock::now();
  int64_t steps_this_run = 0;
  for (int64_t step = done_steps; step < options.steps; ++step) {
    const auto step_start = std::chrono::steady_clock::now();
    const TokenBatch batch = sampler.Batch(step);

    // Forward, backward, update.
    double loss_value = 0;
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors(
        absl::StrCat("training step ", step + 1), [&] {
          optimizer.zero_grad();
          const at::Tensor input =
              model->EmbedWithPrompt(batch.token_ids, adapters);
          const at::Tensor output =
              remote != nullptr ? remote->Run(input, adapters)
                                : model->RunBlocks(input, 0, num_blocks,
                                                   adapters);
          const at::Tensor loss =
              TrainingModel::Loss(model->Logits(output, adapters),
                                  batch.token_ids,
                                  batch.mask, adapters.PrefixLength());
          loss.backward();
          optimizer.step();
          loss_value = loss.item<double>();
          return absl::OkStatus();
        }));

    // Report.
    const auto now = std::chrono::steady_clock::now();
    const double step_s =
        std::chrono::duration<double>(now - step_start).count();
    const double elapsed_s = std::chrono::duration<double>(now - start).count();
    ++steps_this_run;
    StepReport report;
    report.step = step + 1;
    report.total_steps = options.steps;
    report.loss = loss_value;
    report.tokens_per_s = step_s > 0 ? batch.num_tokens / step_s : 0;
    report.eta_s = elapsed_s / steps_this_run * (options.steps - step - 1);
    if (loss_log.is_open()) {
      loss_log << absl::StrFormat("%d,%.8g,%.1f\n", report.step, report.loss,
                                  report.tokens_per_s)
               << std::flush;
    }
    if (on_step) on_step(report);
    if (steps_this_run == 1) result.first_loss = loss_value;
    result.last_loss = loss_value;
    result.steps_done = step + 1;
    if (stop != nullptr && stop->load()) {
      result.interrupted = true;
      POLLEN_LOG_WARN("Fine-tuning interrupted after step {}; saving to {}",
                      result.steps_done, options.output_dir);
      break;
    }
  }

  POLLEN_RETURN_IF_ERROR(SaveTrainingState(adapters, optimizer,
                                           result.steps_done,
                                           options.output_dir));
  return result;
}

}  // namespace pollen::client
