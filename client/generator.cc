// Client and ChatSession: tokenize, embed, run the chain, sample.
#include <chrono>
#include <numeric>
#include <optional>
#include <utility>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "client/model_head.h"
#include "client/remote_chain.h"
#include "client/sampler.h"
#include "client/step_group.h"
#include "client/swarm_client.h"
#include "client/text_stream.h"
#include "client/tokenizer.h"
#include "client/training/adapter_set.h"
#include "common/activation_compression.h"
#include "common/checkpoint.h"
#include "common/logging.h"
#include "common/model_id.h"
#include "common/status_util.h"
#include "pollen/client.h"

namespace pollen {

using client::InferenceChain;

class Client::Impl {
 public:
  ClientOptions options;
  std::string model_id;
  std::shared_ptr<const Checkpoint> checkpoint;
  std::unique_ptr<client::ModelHead> head;
  std::unique_ptr<client::Tokenizer> tokenizer;
  std::unique_ptr<client::SwarmClient> swarm;
  ChannelPool channels;
  // The adapter of options.adapter_dir, or none.
  std::optional<client::AdapterSet> adapters;
  // Its LoRA weights and deep prompts, sent when a session opens.
  std::vector<v1::BlockAdapters> block_adapters;
  // options.compression, parsed.
  v1::Compression compression = v1::COMPRESSION_NONE;

  const ModelConfig& config() const { return checkpoint->config(); }

  // Positions an adapter's prompt takes before the first token.
  int64_t prefix_length() const {
    return adapters.has_value() ? adapters->PrefixLength() : 0;
  }

  // Loads options.adapter_dir into `adapters` and `block_adapters`.
  absl::Status LoadAdapter();

  // Embeds `ids` [1, n] and, for the first feed of a session, prepends the
  // adapter's prompt: returns [1, prefix + n, hidden].
  at::Tensor EmbedInput(const std::vector<int>& ids, bool first_feed) const;

  // Finds a route and opens a session of `max_length` positions on it.
  absl::StatusOr<std::unique_ptr<InferenceChain>> OpenChain(int64_t max_length) {
    const int num_blocks = static_cast<int>(config().num_hidden_layers);
    POLLEN_ASSIGN_OR_RETURN(
        std::vector<scheduler::RouteHop> route,
        swarm->FindRoute(model_id, 0, num_blocks, options.discovery_wait, {},
                         max_length));
    client::ChainOptions chain_options;
    chain_options.model_id = model_id;
    chain_options.max_length = max_length;
    chain_options.step_timeout = options.step_timeout;
    chain_options.adapters = block_adapters;
    chain_options.push = options.push;
    chain_options.compression = compression;
    chain_options.reroute = [this, max_length](
                                int start, int end,
                                const std::set<std::string>& excluded,
                                bool wait_for_nodes) {
      scheduler::RouteOptions route_options;
      route_options.excluded_nodes = excluded;
      return swarm->FindRoute(
          model_id, start, end,
          wait_for_nodes ? options.discovery_wait : absl::ZeroDuration(),
          route_options, max_length);
    };
    chain_options.on_node_failure = [this](const std::string& node_id) {
      swarm->ReportFailure(node_id);
    };
    return InferenceChain::Open(channels, route, chain_options);
  }

  // Checks `prompt_ids` and returns the positions a session needs for them
  // and options.max_new_tokens: INVALID_ARGUMENT for an empty prompt, an id
  // outside the vocabulary, or more positions than the model has.
  absl::StatusOr<int64_t> SessionLength(const std::vector<int>& prompt_ids,
                                        const GenerationOptions& options) const;

  // Client::GenerateBatchFromIds.
  absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(
      const std::vector<std::vector<int>>& prompts,
      const GenerationOptions& options, const BatchTextCallback& on_text);

  // Samples the next id from the last position of `output` [1, n, hidden],
  // appends it to `history` and result->new_ids, and passes its text to
  // `on_text`. INTERNAL when no id can be sampled.
  absl::StatusOr<int> SampleNext(const at::Tensor& output,
                                 client::Sampler& sampler,
                                 client::TextStream& text,
                                 std::vector<int>& history,
                                 GenerationResult* result,
                                 const TextCallback& on_text) const;

  // Completes the `result` of a sequence that stopped: its route, the rest
  // of its text, and ms_per_token over `elapsed_ms`.
  void FinishResult(const InferenceChain& chain, client::TextStream& text,
                    const TextCallback& on_text, double elapsed_ms,
                    GenerationResult* result) const;

  // Feeds `input_ids` after `history` (the ids the chain already holds,
  // plus the last sampled id when it was not fed yet) and samples up to
  // options.max_new_tokens ids. Appends what it feeds and samples to
  // `history`. The last sampled id is not fed to the chain.
  absl::StatusOr<GenerationResult> Continue(InferenceChain& chain,
                                            std::vector<int>& history,
                                            const std::vector<int>& input_ids,
                                            int64_t max_length,
                                            const GenerationOptions& options,
                                            const TextCallback& on_text);
};

namespace {

absl::Status ValidateIds(const std::vector<int>& ids, int64_t vocab_size) {
  for (const int id : ids) {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", id, " is outside the vocabulary 0..", vocab_size - 1));
    }
  }
  return absl::OkStatus();
}

std::vector<RouteHopInfo> DescribeRoute(const InferenceChain& chain) {
  std::vector<RouteHopInfo> hops;
  for (const scheduler::RouteHop& hop : chain.route()) {
    hops.push_back(
        RouteHopInfo{hop.server.node_id, hop.server.address, hop.start, hop.end});
  }
  return hops;
}

at::Tensor IdsToTensor(const std::vector<int>& ids) {
  std::vector<int64_t> wide(ids.begin(), ids.end());
  return at::tensor(wide, at::kLong).reshape({1, -1});
}

}  // namespace

absl::Status ValidateGenerationOptions(const GenerationOptions& options) {
  POLLEN_RETURN_IF_ERROR(client::ValidateSamplingOptions(options.sampling));
  if (options.max_new_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_new_tokens must be at least 1, got ", options.max_new_tokens));
  }
  return absl::OkStatus();
}

absl::Status Client::Impl::LoadAdapter() {
  POLLEN_ASSIGN_OR_RETURN(
      client::AdapterSet loaded,
      client::LoadAdapters(options.adapter_dir, config(), at::kCPU));
  google::protobuf::RepeatedPtrField<v1::BlockAdapters> protos;
  POLLEN_RETURN_IF_ERROR(client::AppendBlockAdapters(
      loaded, 0, static_cast<int>(config().num_hidden_layers), &protos));
  block_adapters.assign(protos.begin(), protos.end());
  if (loaded.lm_head.defined()) {
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors("loading the adapter's head", [&] {
      head = client::ModelHead::WithHead(*head, loaded.norm, loaded.lm_head);
      return absl::OkStatus();
    }));
  }
  POLLEN_LOG_INFO("using {} adapter from {} ({} prompt positions, {} blocks "
                  "with node-side weights, {} head)",
                  client::AdapterMethodName(loaded.config.method),
                  options.adapter_dir, loaded.PrefixLength(),
                  block_adapters.size(),
                  loaded.lm_head.defined() ? "trained" : "checkpoint");
  adapters = std::move(loaded);
  return absl::OkStatus();
}

at::Tensor Client::Impl::EmbedInput(const std::vector<int>& ids,
                                    bool first_feed) const {
  const at::Tensor embedded = head->Embed(IdsToTensor(ids));
  if (!first_feed || prefix_length() == 0) return embedded;
  const at::Tensor prompt =
      adapters->prompt.to(embedded.device(), embedded.scalar_type())
          .unsqueeze(0);
  return at::cat({prompt, embedded}, 1);
}

absl::StatusOr<GenerationResult> Client::Impl::Continue(
    InferenceChain& chain, std::vector<int>& history,
    const std::vector<int>& input_ids, int64_t max_length,
    const GenerationOptions& options, const TextCallback& on_text) {
  POLLEN_RETURN_IF_ERROR(ValidateGenerationOptions(options));
  POLLEN_RETURN_IF_ERROR(ValidateIds(input_ids, config().vocab_size));
  if (input_ids.empty()) {
    return absl::InvalidArgumentError("nothing to feed: the input has no tokens");
  }
  const int64_t prompt_positions = chain.position() == 0 ? prefix_length() : 0;
  const int64_t room = max_length - chain.position() - prompt_positions -
                       static_cast<int64_t>(input_ids.size());
  if (room < 1) {
    return absl::OutOfRangeError(absl::StrCat(
        "the session contains ", chain.position(), " of ", max_length,
        " positions and cannot take ", input_ids.size(), " more tokens"));
  }
  const int max_new_tokens =
      static_cast<int>(std::min<int64_t>(options.max_new_tokens, room));

  GenerationResult result;
  result.prompt_ids = input_ids;
  history.insert(history.end(), input_ids.begin(), input_ids.end());
  // The stream decodes new ids after the context, so that the first new
  // piece keeps its leading space.
  client::TextStream text_stream(*tokenizer, history);
  client::Sampler sampler(options.sampling);
  const auto started = std::chrono::steady_clock::now();
  at::NoGradGuard no_grad;

  std::vector<int> to_feed = input_ids;
  for (int i = 0; i < max_new_tokens; ++i) {
    // Run the new tokens through the swarm and sample after the last one.
    at::Tensor output;
    POLLEN_RETURN_IF_ERROR(CatchTorchErrors("embedding the input", [&]() {
      auto stepped =
          chain.Step(EmbedInput(to_feed, /*first_feed=*/chain.position() == 0));
      if (!stepped.ok()) return stepped.status();
      output = *std::move(stepped);
      return absl::OkStatus();
    }));
    POLLEN_ASSIGN_OR_RETURN(
        const int next,
        SampleNext(output, sampler, text_stream, history, &result, on_text));
    if (options.stop_at_eos && next == config().eos_token_id) {
      result.finish_reason = "eos";
      break;
    }
    to_feed = {next};
  }
  if (result.finish_reason.empty()) {
    result.finish_reason =
        max_new_tokens < options.max_new_tokens ? "max_length" : "max_new_tokens";
  }
  FinishResult(chain, text_stream, on_text,
               std::chrono::duration<double, std::milli>(
                   std::chrono::steady_clock::now() - started)
                   .count(),
               &result);
  return result;
}

absl::StatusOr<int> Client::Impl::SampleNext(
    const at::Tensor& output, client::Sampler& sampler, client::TextStream& text,
    std::vector<int>& history, GenerationResult* result,
    const TextCallback& on_text) const {
  at::Tensor logits;
  POLLEN_RETURN_IF_ERROR(CatchTorchErrors("computing the logits", [&] {
    logits = head->Logits(output.slice(1, -1))[0][0];
    return absl::OkStatus();
  }));
  const int next = sampler.Sample(logits, history);
  if (next < 0) {
    return absl::InternalError(absl::StrCat(
        "sampling failed at new token ", result->new_ids.size(),
        ": the logits are all NaN or -inf, or misshaped (see the log)"));
  }
  history.push_back(next);
  result->new_ids.push_back(next);
  const std::string piece = text.Push(next);
  if (on_text && !piece.empty()) on_text(piece);
  return next;
}

void Client::Impl::FinishResult(const InferenceChain& chain,
                                client::TextStream& text,
                                const TextCallback& on_text, double elapsed_ms,
                                GenerationResult* result) const {
  // Failovers may have changed the route; report the one that finished.
  result->route = DescribeRoute(chain);
  const std::string rest = text.Flush();
  if (on_text && !rest.empty()) on_text(rest);
  result->text = text.text();
  result->ms_per_token = elapsed_ms / result->new_ids.size();
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

absl::Status ValidateClientWaits(const ClientOptions& options) {
  if (options.discovery_wait < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "discovery wait ", absl::FormatDuration(options.discovery_wait),
        " is negative; use 0 s or more (--discovery-wait-s)"));
  }
  if (options.step_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step timeout ", absl::FormatDuration(options.step_timeout),
        " must be positive (--step-timeout-s)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const ClientOptions& options) {
  POLLEN_RETURN_IF_ERROR(ValidateClientWaits(options));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->model_id = options.model_id.empty() ? DefaultModelId(options.model_dir)
                                            : options.model_id;
  POLLEN_ASSIGN_OR_RETURN(impl->compression,
                          ParseCompression(options.compression));
  POLLEN_ASSIGN_OR_RETURN(impl->checkpoint, Checkpoint::Open(options.model_dir));
  POLLEN_ASSIGN_OR_RETURN(
      impl->head,
      client::ModelHead::Load(*impl->checkpoint, at::kFloat, at::kCPU));
  POLLEN_ASSIGN_OR_RETURN(
      impl->tokenizer,
      client::Tokenizer::Load(options.model_dir + "/tokenizer.model"));
  if (!options.adapter_dir.empty()) {
    POLLEN_RETURN_IF_ERROR(impl->LoadAdapter());
  }
  POLLEN_ASSIGN_OR_RETURN(impl->swarm,
                          client::SwarmClient::Connect(options.initial_peers));
  POLLEN_LOG_INFO("client for {} joined the swarm through {} peer(s)",
                  impl->model_id, options.initial_peers.size());
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

const std::string& Client::model_id() const { return impl_->model_id; }

absl::StatusOr<GenerationResult> Client::Generate(
    const std::string& prompt, const GenerationOptions& options,
    const TextCallback& on_text) {
  return GenerateFromIds(impl_->tokenizer->Encode(prompt, /*add_bos=*/true),
                         options, on_text);
}

absl::StatusOr<int64_t> Client::Impl::SessionLength(
    const std::vector<int>& prompt_ids, const GenerationOptions& options) const {
  POLLEN_RETURN_IF_ERROR(ValidateIds(prompt_ids, config().vocab_size));
  if (prompt_ids.empty()) {
    return absl::InvalidArgumentError("nothing to feed: the input has no tokens");
  }
  const int64_t limit = config().max_position_embeddings;
  const int64_t prefix = prefix_length();
  const int64_t max_length =
      prefix + static_cast<int64_t>(prompt_ids.size()) + options.max_new_tokens;
  if (max_length > limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt_ids.size(), " tokens plus ", options.max_new_tokens,
        " new tokens", prefix > 0 ? absl::StrCat(" plus the adapter's ", prefix,
                                                 " prompt positions")
                                  : "",
        " exceeds the model's ", limit, " positions"));
  }
  return max_length;
}

absl::StatusOr<GenerationResult> Client::GenerateFromIds(
    const std::vector<int>& prompt_ids, const GenerationOptions& options,
    const TextCallback& on_text) {
  // Check the request before any node reserves cache for it.
  POLLEN_RETURN_IF_ERROR(ValidateGenerationOptions(options));
  POLLEN_ASSIGN_OR_RETURN(const int64_t max_length,
                          impl_->SessionLength(prompt_ids, options));
  POLLEN_ASSIGN_OR_RETURN(std::unique_ptr<InferenceChain> chain,
                          impl_->OpenChain(max_length));
  std::vector<int> history;
  return impl_->Continue(*chain, history, prompt_ids, max_length, options,
                         on_text);
}

absl::StatusOr<std::vector<GenerationResult>> Client::GenerateBatch(
    const std::vector<std::string>& prompts, const GenerationOptions& options,
    const BatchTextCallback& on_text) {
  std::vector<std::vector<int>> ids;
  for (const std::string& prompt : prompts) {
    ids.push_back(impl_->tokenizer->Encode(prompt, /*add_bos=*/true));
  }
  return GenerateBatchFromIds(ids, options, on_text);
}

absl::StatusOr<std::vector<GenerationResult>> Client::GenerateBatchFromIds(
    const std::vector<std::vector<int>>& prompts,
    const GenerationOptions& options, const BatchTextCallback& on_text) {
  return impl_->GenerateBatch(prompts, options, on_text);
}

namespace {

// One sequence of a batch: its session, and what it has generated.
struct BatchSequence {
  std::unique_ptr<InferenceChain> chain;
  std::vector<int> history;  // the prompt, then every sampled id
  std::optional<client::TextStream> text;
  std::optional<client::Sampler> sampler;
  // The batch's callback, for this sequence's index.
  TextCallback on_text;
  GenerationResult result;
  bool done = false;
};

absl::Status ForPrompt(size_t index, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat("prompt at index ", index,
                                                  ": ", status.message()));
}

}  // namespace

absl::StatusOr<std::vector<GenerationResult>> Client::Impl::GenerateBatch(
    const std::vector<std::vector<int>>& prompts,
    const GenerationOptions& options, const BatchTextCallback& on_text) {
  // Check every prompt before any node reserves cache for one.
  POLLEN_RETURN_IF_ERROR(ValidateGenerationOptions(options));
  if (prompts.empty() || prompts.size() > static_cast<size_t>(kMaxBatchPrompts)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a batch takes 1 to ", kMaxBatchPrompts, " prompts, got ",
        prompts.size()));
  }
  std::vector<int64_t> lengths;
  for (size_t i = 0; i < prompts.size(); ++i) {
    absl::StatusOr<int64_t> length = SessionLength(prompts[i], options);
    POLLEN_RETURN_IF_ERROR(ForPrompt(i, length.status()));
    lengths.push_back(*length);
  }

  at::NoGradGuard no_grad;
  std::vector<BatchSequence> sequences(prompts.size());

  // Samples the next id of sequence `i` from its `output` [1, n, hidden].
  auto take = [&](size_t i, const at::Tensor& output) -> absl::Status {
    BatchSequence& sequence = sequences[i];
    POLLEN_ASSIGN_OR_RETURN(
        const int next,
        SampleNext(output, *sequence.sampler, *sequence.text, sequence.history,
                   &sequence.result, sequence.on_text));
    if (options.stop_at_eos && next == config().eos_token_id) {
      sequence.result.finish_reason = "eos";
    } else if (static_cast<int>(sequence.result.new_ids.size()) >=
               options.max_new_tokens) {
      sequence.result.finish_reason = "max_new_tokens";
    }
    sequence.done = !sequence.result.finish_reason.empty();
    return absl::OkStatus();
  };

  // A session per prompt, then one step of every unfinished sequence at a
  // time, together: the prompts first, then one token each.
  for (size_t i = 0; i < prompts.size(); ++i) {
    BatchSequence& sequence = sequences[i];
    absl::StatusOr<std::unique_ptr<InferenceChain>> chain = OpenChain(lengths[i]);
    if (absl::IsResourceExhausted(chain.status()) && prompts.size() > 1) {
      // Retrying cannot help when the whole batch never fits.
      const int64_t total =
          std::accumulate(lengths.begin(), lengths.end(), int64_t{0});
      chain = absl::ResourceExhaustedError(absl::StrCat(
          chain.status().message(), "; the batch's ", prompts.size(),
          " sessions need ", total, " cache tokens in all on each node, so use "
          "fewer prompts or new tokens, or nodes with more --cache-tokens"));
    }
    POLLEN_RETURN_IF_ERROR(ForPrompt(i, chain.status()));
    sequence.chain = *std::move(chain);
    sequence.history = prompts[i];
    sequence.result.prompt_ids = prompts[i];
    sequence.text.emplace(*tokenizer, sequence.history);
    sequence.sampler.emplace(options.sampling);
    if (on_text) {
      sequence.on_text = [&on_text, i](const std::string& piece) {
        on_text(static_cast<int>(i), piece);
      };
    }
  }
  // Timed as Generate times one sequence: from its first step.
  const auto started = std::chrono::steady_clock::now();
  client::StepGroup group;
  while (true) {
    std::vector<size_t> active;
    std::vector<InferenceChain*> chains;
    std::vector<at::Tensor> inputs;
    for (size_t i = 0; i < sequences.size(); ++i) {
      BatchSequence& sequence = sequences[i];
      if (sequence.done) continue;
      active.push_back(i);
      chains.push_back(sequence.chain.get());
      const bool first_feed = sequence.chain->position() == 0;
      POLLEN_RETURN_IF_ERROR(ForPrompt(i, CatchTorchErrors("embedding the input", [&] {
        inputs.push_back(first_feed
                             ? EmbedInput(prompts[i], /*first_feed=*/true)
                             : EmbedInput({sequence.history.back()},
                                          /*first_feed=*/false));
        return absl::OkStatus();
      })));
    }
    if (active.empty()) break;
    std::vector<absl::StatusOr<at::Tensor>> outputs = group.Step(chains, inputs);
    for (size_t k = 0; k < active.size(); ++k) {
      POLLEN_RETURN_IF_ERROR(ForPrompt(active[k], outputs[k].status()));
      POLLEN_RETURN_IF_ERROR(ForPrompt(active[k], take(active[k], *outputs[k])));
    }
  }

  const double elapsed_ms = std::chrono::duration<double, std::milli>(
                                std::chrono::steady_clock::now() - started)
                                .count();
  std::vector<GenerationResult> results;
  for (BatchSequence& sequence : sequences) {
    FinishResult(*sequence.chain, *sequence.text, sequence.on_text, elapsed_ms,
                 &sequence.result);
    results.push_back(std::move(sequence.result));
  }
  return results;
}

class ChatSession::Impl {
 public:
  Client::Impl* client = nullptr;
  std::unique_ptr<InferenceChain> chain;
  int64_t max_length = 0;
  // Ids fed to the chain, plus the last sampled id when `pending` is set.
  std::vector<int> history;
  bool pending = false;
};

ChatSession::ChatSession(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChatSession::~ChatSession() = default;

absl::StatusOr<std::unique_ptr<ChatSession>> Client::StartChat(int max_length) {
  // The adapter's prompt positions come on top of the conversation's.
  const int64_t prefix = impl_->prefix_length();
  const int64_t limit = impl_->config().max_position_embeddings - prefix;
  if (max_length == 0) max_length = static_cast<int>(limit);
  if (max_length < 2 || max_length > limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chat max_length ", max_length, " is outside 2..", limit,
        " (the model's positions",
        prefix > 0 ? absl::StrCat(" less the adapter's ", prefix, " prompt positions")
                   : "",
        ")"));
  }
  auto session = std::make_unique<ChatSession::Impl>();
  session->client = impl_.get();
  session->max_length = prefix + max_length;
  POLLEN_ASSIGN_OR_RETURN(session->chain, impl_->OpenChain(session->max_length));
  return std::unique_ptr<ChatSession>(new ChatSession(std::move(session)));
}

absl::StatusOr<GenerationResult> ChatSession::Send(
    const std::string& text, const GenerationOptions& options,
    const TextCallback& on_text) {
  Impl& session = *impl_;
  const bool first_turn = session.history.empty();
  std::vector<int> input =
      session.client->tokenizer->Encode(text, /*add_bos=*/first_turn);

  // The reply's last id was sampled but never fed; it leads this turn.
  std::vector<int> history = session.history;
  if (session.pending) {
    input.insert(input.begin(), history.back());
    history.pop_back();
  }
  auto result = session.client->Continue(*session.chain, history, input,
                                         session.max_length, options, on_text);
  if (!result.ok()) return result.status();

  session.history = std::move(history);
  session.pending = true;
  // prompt_ids reports what the user's turn added, without the carried id.
  if (!first_turn) result->prompt_ids.erase(result->prompt_ids.begin());
  return result;
}

}  // namespace pollen
