#include "client/bench/bench_runner.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client/bench/greedy_decoder.h"
#include "client/bench/loopback_swarm.h"
#include "client/model_head.h"
#include "client/step_group.h"
#include "client/tokenizer.h"
#include "common/activation_compression.h"
#include "common/checkpoint.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/model_id.h"
#include "common/status_util.h"
#include "node/block_span.h"

namespace pollen::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Source of the prompt; its tokens repeat until the prompt is long enough.
constexpr char kPromptText[] =
    "The old lighthouse keeper climbed the stairs every evening to light the "
    "lamp. Ships passing the rocky coast trusted its beam, and the sailors "
    "told stories about the man who never missed a night.";

// Largest --threads accepted: a sanity limit on a mistyped value.
constexpr int kMaxThreads = 1024;

// One greedy generation's tokens and phase times.
struct TimedRun {
  std::vector<int> new_ids;
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Creates the block runner of one session; called once per run.
using RunnerFactory = std::function<absl::StatusOr<BlockRunner>()>;

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t middle = values.size() / 2;
  return values.size() % 2 == 1 ? values[middle]
                                : (values[middle - 1] + values[middle]) / 2;
}

// BOS, then the prompt text's tokens, repeated, up to `length` ids.
absl::StatusOr<std::vector<int>> MakePromptIds(const std::string& model_dir,
                                               int length) {
  POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<client::Tokenizer> tokenizer,
                          client::Tokenizer::Load(model_dir + "/tokenizer.model"));
  const std::vector<int> text_ids = tokenizer->Encode(kPromptText, false);
  if (text_ids.empty()) {
    return absl::InternalError("the tokenizer encodes the prompt text to nothing");
  }
  std::vector<int> ids;
  if (tokenizer->bos_id() >= 0) ids.push_back(tokenizer->bos_id());
  while (static_cast<int>(ids.size()) < length) {
    ids.insert(ids.end(), text_ids.begin(), text_ids.end());
  }
  ids.resize(length);
  return ids;
}

absl::StatusOr<TimedRun> RunOnce(const client::ModelHead& head,
                                 const RunnerFactory& make_runner,
                                 const std::vector<int>& prompt_ids,
                                 int decode_steps) {
  POLLEN_ASSIGN_OR_RETURN(BlockRunner runner, make_runner());
  GreedyDecoder decoder(head, std::move(runner));
  POLLEN_RETURN_IF_ERROR(decoder.Prefill(prompt_ids));
  POLLEN_RETURN_IF_ERROR(decoder.Decode(decode_steps));
  return TimedRun{decoder.new_ids(), decoder.prefill_seconds(),
                  decoder.decode_seconds()};
}

// One untimed warm-up of two decode steps, then `repetitions` timed runs.
absl::StatusOr<std::vector<TimedRun>> RunRepeated(
    const client::ModelHead& head, const RunnerFactory& make_runner,
    const std::vector<int>& prompt_ids, int decode_steps, int repetitions) {
  POLLEN_RETURN_IF_ERROR(
      RunOnce(head, make_runner, prompt_ids, std::min(decode_steps, 2)).status());
  std::vector<TimedRun> runs;
  for (int i = 0; i < repetitions; ++i) {
    POLLEN_ASSIGN_OR_RETURN(TimedRun run,
                            RunOnce(head, make_runner, prompt_ids, decode_steps));
    POLLEN_LOG_INFO("run {} of {}: prefill {:.3f} s, decode {:.3f} s", i + 1,
                    repetitions, run.prefill_seconds, run.decode_seconds);
    runs.push_back(std::move(run));
  }
  return runs;
}

// Sets the median decode and prefill speeds of `runs`.
void MedianSpeeds(const std::vector<TimedRun>& runs, int prompt_tokens,
                  int decode_steps, double* decode_tok_s, double* prefill_tok_s) {
  std::vector<double> decode;
  std::vector<double> prefill;
  for (const TimedRun& run : runs) {
    decode.push_back(decode_steps / std::max(run.decode_seconds, 1e-9));
    prefill.push_back(prompt_tokens / std::max(run.prefill_seconds, 1e-9));
  }
  *decode_tok_s = Median(decode);
  *prefill_tok_s = Median(prefill);
}

// Compares every run's tokens with the reference and records the first
// difference in `result`.
void CheckTokens(const std::vector<int>& reference, const std::string& what,
                 const std::vector<TimedRun>& runs, BenchResult& result) {
  for (size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].new_ids == reference || !result.mismatch.empty()) continue;
    result.mismatch = absl::StrCat(
        what, " ", i + 1, " picked [", absl::StrJoin(runs[i].new_ids, " "),
        "]; the first local run picked [", absl::StrJoin(reference, " "), "]");
  }
}

// `sessions` sessions through the swarm, each on its own thread with its
// own streams, as separate clients would run them: all feed
// their prompt, then all decode at once. Returns the decode tokens of all
// sessions per second of wall time, from the common start to the last
// finish, and each session's run in `runs`.
absl::StatusOr<double> RunConcurrentSessions(const client::ModelHead& head,
                                             LoopbackSwarm& swarm,
                                             const std::vector<int>& prompt_ids,
                                             int decode_steps, int sessions,
                                             std::vector<TimedRun>* runs) {
  const int64_t max_length =
      static_cast<int64_t>(prompt_ids.size()) + decode_steps;
  absl::BlockingCounter prefilled(sessions);
  absl::Notification start;
  absl::Mutex mu;
  absl::Status first_error;
  std::vector<Clock::time_point> finished(sessions);
  runs->assign(sessions, TimedRun{});

  auto session = [&](int index) {
    auto chain = swarm.OpenSession(max_length);
    absl::Status status = chain.status();
    std::unique_ptr<GreedyDecoder> decoder;
    if (status.ok()) {
      client::InferenceChain* raw = chain->get();
      decoder = std::make_unique<GreedyDecoder>(
          head, [raw](const at::Tensor& hidden) { return raw->Step(hidden); });
      status = decoder->Prefill(prompt_ids);
    }
    prefilled.DecrementCount();
    start.WaitForNotification();
    if (status.ok()) status = decoder->Decode(decode_steps);
    finished[index] = Clock::now();
    if (status.ok()) {
      (*runs)[index] = TimedRun{decoder->new_ids(), decoder->prefill_seconds(),
                                decoder->decode_seconds()};
    } else {
      absl::MutexLock lock(&mu);
      if (first_error.ok()) {
        first_error = absl::Status(
            status.code(), absl::StrCat("session ", index, ": ", status.message()));
      }
    }
  };

  std::vector<std::thread> threads;
  for (int i = 0; i < sessions; ++i) threads.emplace_back(session, i);
  prefilled.Wait();
  const Clock::time_point started = Clock::now();
  start.Notify();
  for (std::thread& thread : threads) thread.join();
  POLLEN_RETURN_IF_ERROR(first_error);

  const Clock::time_point last = *std::max_element(finished.begin(), finished.end());
  const double seconds = std::chrono::duration<double>(last - started).count();
  return static_cast<double>(sessions) * decode_steps / std::max(seconds, 1e-9);
}

// Returns the embeddings [1, 1, hidden] of `ids`, one tensor per id, from
// one lookup.
absl::StatusOr<std::vector<at::Tensor>> EmbedRows(const client::ModelHead& head,
                                                  const std::vector<int>& ids) {
  c10::InferenceMode inference_mode;
  std::vector<at::Tensor> rows;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("embedding the inputs", [&] {
    const std::vector<int64_t> wide(ids.begin(), ids.end());
    const at::Tensor hidden =
        head.Embed(at::tensor(wide, at::kLong).reshape({-1, 1}));
    for (int64_t i = 0; i < hidden.size(0); ++i) {
      rows.push_back(hidden.slice(0, i, i + 1));
    }
    return absl::OkStatus();
  }));
  return rows;
}

// Returns the greedy pick after the last position of each of `outputs`
// [1, tokens, hidden], from one LM head pass over all of them. Errors name
// the logits after `token_index` new tokens.
absl::StatusOr<std::vector<int>> PickRows(const client::ModelHead& head,
                                          const std::vector<at::Tensor>& outputs,
                                          int token_index) {
  c10::InferenceMode inference_mode;
  at::Tensor logits;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("computing the logits", [&] {
    // The last rows side by side. Float32 CPU outputs are copied with
    // memcpy, since a libtorch slice per session costs more than the copy.
    const int64_t hidden = head.config().hidden_size;
    const int64_t count = static_cast<int64_t>(outputs.size());
    at::Tensor last = at::empty({count, hidden}, at::kFloat);
    float* last_rows = last.data_ptr<float>();
    for (int64_t i = 0; i < count; ++i) {
      const at::Tensor& output = outputs[i];
      if (output.is_cpu() && output.scalar_type() == at::kFloat &&
          output.is_contiguous() && output.numel() >= hidden) {
        std::memcpy(last_rows + i * hidden,
                    output.data_ptr<float>() + output.numel() - hidden,
                    hidden * sizeof(float));
      } else {
        last[i].copy_(output.reshape({-1, hidden})[-1]);
      }
    }
    logits = head.Logits(last).to(at::kCPU, at::kFloat).contiguous();
    return absl::OkStatus();
  }));
  const int64_t vocab = logits.size(1);
  const float* rows = logits.data_ptr<float>();
  std::vector<int> ids;
  for (int64_t i = 0; i < logits.size(0); ++i) {
    POLLEN_ASSIGN_OR_RETURN(const int id,
                            GreedyPick(rows + i * vocab, vocab, token_index));
    ids.push_back(id);
  }
  return ids;
}

// `sessions` sessions through the swarm, driven by this thread through one
// StepGroup: each session feeds its prompt, then every decode step of all
// sessions travels together. Returns the decode tokens of all sessions per
// second of wall time, and each session's run in `runs`.
absl::StatusOr<double> RunGroupedSessions(const client::ModelHead& head,
                                          LoopbackSwarm& swarm,
                                          const std::vector<int>& prompt_ids,
                                          int decode_steps, int sessions,
                                          std::vector<TimedRun>* runs) {
  const int64_t max_length =
      static_cast<int64_t>(prompt_ids.size()) + decode_steps;
  std::vector<std::unique_ptr<client::InferenceChain>> chains;
  std::vector<client::InferenceChain*> members;
  std::vector<std::unique_ptr<GreedyDecoder>> decoders;
  for (int i = 0; i < sessions; ++i) {
    POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<client::InferenceChain> chain,
                            swarm.OpenSession(max_length));
    client::InferenceChain* raw = chain.get();
    auto decoder = std::make_unique<GreedyDecoder>(
        head, [raw](const at::Tensor& hidden) { return raw->Step(hidden); });
    const absl::Status prefilled = decoder->Prefill(prompt_ids);
    if (!prefilled.ok()) {
      return absl::Status(prefilled.code(), absl::StrCat("session ", i, ": ",
                                                         prefilled.message()));
    }
    members.push_back(raw);
    chains.push_back(std::move(chain));
    decoders.push_back(std::move(decoder));
  }

  // Each step embeds every session's last token at once, runs them through
  // the swarm together, and picks every next token from one LM head pass.
  client::StepGroup group;
  const Clock::time_point started = Clock::now();
  for (int step = 0; step < decode_steps; ++step) {
    const Clock::time_point step_started = Clock::now();
    std::vector<int> last_ids;
    for (const auto& decoder : decoders) {
      last_ids.push_back(decoder->new_ids().back());
    }
    POLLEN_ASSIGN_OR_RETURN(std::vector<at::Tensor> inputs,
                            EmbedRows(head, last_ids));
    std::vector<absl::StatusOr<at::Tensor>> outputs = group.Step(members, inputs);
    std::vector<at::Tensor> finished;
    for (int i = 0; i < sessions; ++i) {
      if (!outputs[i].ok()) {
        return absl::Status(outputs[i].status().code(),
                            absl::StrCat("session ", i, ": ",
                                         outputs[i].status().message()));
      }
      finished.push_back(*std::move(outputs[i]));
    }
    POLLEN_ASSIGN_OR_RETURN(std::vector<int> next_ids,
                            PickRows(head, finished, step + 1));
    const double seconds =
        std::chrono::duration<double>(Clock::now() - step_started).count();
    for (int i = 0; i < sessions; ++i) {
      POLLEN_RETURN_IF_ERROR(decoders[i]->Append(next_ids[i], seconds));
    }
  }
  const double seconds =
      std::chrono::duration<double>(Clock::now() - started).count();

  runs->clear();
  for (const auto& decoder : decoders) {
    runs->push_back(TimedRun{decoder->new_ids(), decoder->prefill_seconds(),
                             decoder->decode_seconds()});
  }
  return static_cast<double>(sessions) * decode_steps / std::max(seconds, 1e-9);
}

absl::Status WithPhase(const absl::Status& status, const char* phase) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(phase, ": ", status.message()));
}

}  // namespace

absl::Status ValidateBenchOptions(const BenchOptions& options,
                                  const ModelConfig& config) {
  const int num_blocks = static_cast<int>(config.num_hidden_layers);
  auto outside = [](const char* option, int64_t value, int64_t low, int64_t high,
                    const std::string& reason) {
    return absl::InvalidArgumentError(absl::StrCat(
        option, " ", value, " is outside ", low, "..", high, reason));
  };
  if (options.num_nodes < 1 || options.num_nodes > num_blocks) {
    return outside("--nodes", options.num_nodes, 1, num_blocks,
                   " (the model's blocks)");
  }
  if (options.sessions < 1 || options.sessions > kMaxBenchSessions) {
    return outside("--sessions", options.sessions, 1, kMaxBenchSessions, "");
  }
  if (options.repetitions < 1 || options.repetitions > 1000) {
    return outside("--repetitions", options.repetitions, 1, 1000, "");
  }
  if (options.threads < 0 || options.threads > kMaxThreads) {
    return outside("--threads", options.threads, 0, kMaxThreads,
                   " (0 keeps libtorch's default)");
  }
  const int64_t max_positions = config.max_position_embeddings;
  if (options.prompt_tokens < 1 || options.prompt_tokens >= max_positions) {
    return outside("--prompt-tokens", options.prompt_tokens, 1,
                   max_positions - 1, " (the model's positions, less one)");
  }
  if (options.new_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--new-tokens must be at least 1, got ", options.new_tokens));
  }
  if (options.prompt_tokens + static_cast<int64_t>(options.new_tokens) >
      max_positions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prompt-tokens ", options.prompt_tokens, " plus --new-tokens ",
        options.new_tokens, " exceed the model's ", max_positions,
        " positions"));
  }
  POLLEN_RETURN_IF_ERROR(ParseDtype(options.dtype).status());
  POLLEN_RETURN_IF_ERROR(ParseCompression(options.compression).status());
  if (options.pollen_binary.empty()) {
    return absl::InvalidArgumentError("the path of the pollen binary is empty");
  }
  return absl::OkStatus();
}

absl::StatusOr<BenchResult> RunBench(const BenchOptions& options) {
  POLLEN_ASSIGN_OR_RETURN(std::shared_ptr<const Checkpoint> checkpoint,
                          Checkpoint::Open(options.model_dir));
  const ModelConfig& config = checkpoint->config();
  POLLEN_RETURN_IF_ERROR(ValidateBenchOptions(options, config));
  POLLEN_ASSIGN_OR_RETURN(const at::ScalarType dtype, ParseDtype(options.dtype));
  if (options.threads > 0) at::set_num_threads(options.threads);

  BenchResult result;
  result.model_id = DefaultModelId(options.model_dir);
  result.num_blocks = static_cast<int>(config.num_hidden_layers);
  result.dtype = DtypeName(dtype);
  POLLEN_ASSIGN_OR_RETURN(const v1::Compression compression,
                          ParseCompression(options.compression));
  result.compression = CompressionName(compression);
  result.threads = at::get_num_threads();
  result.push = options.push;
  result.nodes = options.num_nodes;
  result.sessions = options.sessions;
  result.prompt_tokens = options.prompt_tokens;
  result.new_tokens = options.new_tokens;
  result.repetitions = options.repetitions;

  // Memory bandwidth first, while the model is not loaded.
  POLLEN_ASSIGN_OR_RETURN(result.bandwidth,
                          MeasureMemoryBandwidth(options.bandwidth));

  // The client's side: prompt, embeddings, final norm and LM head.
  POLLEN_ASSIGN_OR_RETURN(const std::vector<int> prompt_ids,
                          MakePromptIds(options.model_dir, options.prompt_tokens));
  POLLEN_ASSIGN_OR_RETURN(
      const std::unique_ptr<client::ModelHead> head,
      client::ModelHead::Load(*checkpoint, at::kFloat, at::kCPU));
  result.head_weight_bytes =
      (config.vocab_size + 1) * config.hidden_size *
      static_cast<int64_t>(sizeof(float));
  const int64_t max_length = options.prompt_tokens + options.new_tokens;

  // Every block in this process, freed before the nodes load theirs. The
  // local runs come before and after the swarm's, so that both sets span
  // the same stretch of the machine's drifting speed.
  std::vector<TimedRun> local_runs;
  auto run_local = [&](const char* when) -> absl::Status {
    POLLEN_ASSIGN_OR_RETURN(
        std::shared_ptr<const node::BlockSpan> span,
        node::BlockSpan::Load(*checkpoint, 0, result.num_blocks, dtype, at::kCPU));
    result.block_weight_bytes = span->ParameterBytes();
    POLLEN_LOG_INFO("local runs {} the swarm's: {} blocks, {} bytes of weights",
                    when, result.num_blocks, result.block_weight_bytes);
    auto local = RunRepeated(
        *head, [&] { return MakeLocalBlockRunner(span, max_length); },
        prompt_ids, options.new_tokens, options.repetitions);
    POLLEN_RETURN_IF_ERROR(WithPhase(local.status(), "local run"));
    local_runs.insert(local_runs.end(), local->begin(), local->end());
    return absl::OkStatus();
  };
  POLLEN_RETURN_IF_ERROR(run_local("before"));
  result.new_ids = local_runs.front().new_ids;

  // The nodes, with cache for every concurrent session plus one.
  LoopbackSwarmOptions swarm_options;
  swarm_options.pollen_binary = options.pollen_binary;
  swarm_options.model_dir = options.model_dir;
  swarm_options.num_nodes = options.num_nodes;
  swarm_options.dtype = options.dtype;
  swarm_options.threads = options.threads;
  swarm_options.push = options.push;
  swarm_options.compression = compression;
  swarm_options.cache_tokens =
      std::max<int64_t>(16384, (options.sessions + 1) * max_length);
  auto swarm = LoopbackSwarm::Start(swarm_options, result.model_id,
                                    result.num_blocks);
  POLLEN_RETURN_IF_ERROR(WithPhase(swarm.status(), "starting the nodes"));

  // One session per run, closed after it.
  std::unique_ptr<client::InferenceChain> chain;
  RunnerFactory open_session = [&]() -> absl::StatusOr<BlockRunner> {
    chain.reset();
    POLLEN_ASSIGN_OR_RETURN(chain, (*swarm)->OpenSession(max_length));
    client::InferenceChain* raw = chain.get();
    return BlockRunner(
        [raw](const at::Tensor& hidden) { return raw->Step(hidden); });
  };
  POLLEN_RETURN_IF_ERROR(WithPhase(
      RunOnce(*head, open_session, prompt_ids, std::min(options.new_tokens, 2))
          .status(),
      "swarm warm-up run"));
  chain.reset();

  // The runs take turns: each repetition runs one session alone, then the
  // sessions driven together by one thread, then each on a thread of its
  // own. The ratios then compare runs seconds apart, not phases of the
  // machine's speed, which drifts by several percent within a minute.
  std::vector<TimedRun> swarm_runs;
  std::vector<double> aggregate;
  std::vector<double> threaded_aggregate;
  std::vector<TimedRun> session_runs;
  for (int i = 0; i < options.repetitions; ++i) {
    auto run = RunOnce(*head, open_session, prompt_ids, options.new_tokens);
    chain.reset();
    POLLEN_RETURN_IF_ERROR(WithPhase(run.status(), "swarm run"));
    POLLEN_LOG_INFO("swarm run {} of {}: prefill {:.3f} s, decode {:.3f} s",
                    i + 1, options.repetitions, run->prefill_seconds,
                    run->decode_seconds);
    swarm_runs.push_back(*std::move(run));

    std::vector<TimedRun> runs;
    auto tok_s = RunGroupedSessions(*head, **swarm, prompt_ids,
                                    options.new_tokens, options.sessions, &runs);
    POLLEN_RETURN_IF_ERROR(WithPhase(tok_s.status(), "grouped sessions"));
    aggregate.push_back(*tok_s);
    session_runs.insert(session_runs.end(), runs.begin(), runs.end());

    tok_s = RunConcurrentSessions(*head, **swarm, prompt_ids, options.new_tokens,
                                  options.sessions, &runs);
    POLLEN_RETURN_IF_ERROR(WithPhase(tok_s.status(), "threaded sessions"));
    threaded_aggregate.push_back(*tok_s);
    session_runs.insert(session_runs.end(), runs.begin(), runs.end());
  }
  MedianSpeeds(swarm_runs, options.prompt_tokens, options.new_tokens,
               &result.swarm_decode_tok_s, &result.swarm_prefill_tok_s);
  result.aggregate_tok_s = Median(aggregate);
  result.threaded_aggregate_tok_s = Median(threaded_aggregate);
  (*swarm)->Stop();
  POLLEN_RETURN_IF_ERROR(run_local("after"));
  MedianSpeeds(local_runs, options.prompt_tokens, options.new_tokens,
               &result.local_decode_tok_s, &result.local_prefill_tok_s);

  // Tokens, ratios and the bound.
  CheckTokens(result.new_ids, "local run", local_runs, result);
  CheckTokens(result.new_ids, "swarm run", swarm_runs, result);
  CheckTokens(result.new_ids, "concurrent session", session_runs, result);
  result.tokens_match = result.mismatch.empty();

  result.decode_ratio = result.swarm_decode_tok_s / result.local_decode_tok_s;
  result.prefill_ratio = result.swarm_prefill_tok_s / result.local_prefill_tok_s;
  result.aggregate_ratio = result.aggregate_tok_s / result.swarm_decode_tok_s;
  result.threaded_aggregate_ratio =
      result.threaded_aggregate_tok_s / result.swarm_decode_tok_s;
  result.hop_overhead_ms = (1000 / result.swarm_decode_tok_s -
                            1000 / result.local_decode_tok_s) /
                           options.num_nodes;
  const int64_t weight_bytes = result.block_weight_bytes + result.head_weight_bytes;
  result.bound_tok_s = result.bandwidth.bytes_per_s / weight_bytes;
  result.bound_fraction = result.local_decode_tok_s / result.bound_tok_s;
  return result;
}

}  // namespace pollen::bench
