#include "client/bench/bench_report.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pollen::bench {

nlohmann::json BenchResultToJson(const BenchResult& result) {
  return {
      {"local_decode_tok_s", result.local_decode_tok_s},
      {"swarm_decode_tok_s", result.swarm_decode_tok_s},
      {"decode_ratio", result.decode_ratio},
      {"local_prefill_tok_s", result.local_prefill_tok_s},
      {"swarm_prefill_tok_s", result.swarm_prefill_tok_s},
      {"prefill_ratio", result.prefill_ratio},
      {"hop_overhead_ms", result.hop_overhead_ms},
      {"sessions", result.sessions},
      {"aggregate_tok_s", result.aggregate_tok_s},
      {"aggregate_ratio", result.aggregate_ratio},
      {"threaded_aggregate_tok_s", result.threaded_aggregate_tok_s},
      {"threaded_aggregate_ratio", result.threaded_aggregate_ratio},
      {"bandwidth_gb_s", result.bandwidth.bytes_per_s / 1e9},
      {"bound_fraction", result.bound_fraction},
      {"model_id", result.model_id},
      {"num_blocks", result.num_blocks},
      {"dtype", result.dtype},
      {"compression", result.compression},
      {"threads", result.threads},
      {"nodes", result.nodes},
      {"push", result.push},
      {"prompt_tokens", result.prompt_tokens},
      {"new_tokens", result.new_tokens},
      {"repetitions", result.repetitions},
      {"tokens_match", result.tokens_match},
      {"mismatch", result.mismatch},
      {"new_ids", result.new_ids},
      {"weight_bytes", result.block_weight_bytes + result.head_weight_bytes},
      {"bound_tok_s", result.bound_tok_s},
      {"bandwidth_method", result.bandwidth.Describe()},
  };
}

std::string FormatBenchReport(const BenchResult& result) {
  std::string out = absl::StrFormat(
      "pollen bench: %s, %d blocks, %s, %d libtorch threads per process\n"
      "prompt of %d tokens, then %d decode steps; median of %d runs; "
      "%d nodes on 127.0.0.1, %s; hidden states compression %s\n\n",
      result.model_id, result.num_blocks, result.dtype, result.threads,
      result.prompt_tokens, result.new_tokens, result.repetitions,
      result.nodes,
      result.push ? "each node pushing to the next" : "the client relaying",
      result.compression);

  absl::StrAppendFormat(&out, "%-18s %12s %12s %12s\n", "", "local", "swarm",
                        "swarm/local");
  absl::StrAppendFormat(&out, "%-18s %12.2f %12.2f %12.3f\n", "decode tok/s",
                        result.local_decode_tok_s, result.swarm_decode_tok_s,
                        result.decode_ratio);
  absl::StrAppendFormat(&out, "%-18s %12.2f %12.2f %12.3f\n", "prefill tok/s",
                        result.local_prefill_tok_s, result.swarm_prefill_tok_s,
                        result.prefill_ratio);
  absl::StrAppendFormat(&out, "%-18s %12.3f %12.3f\n\n", "decode ms/token",
                        1000 / result.local_decode_tok_s,
                        1000 / result.swarm_decode_tok_s);

  absl::StrAppendFormat(&out, "%-18s %.3f ms per node per token\n",
                        "hop overhead", result.hop_overhead_ms);
  absl::StrAppendFormat(
      &out,
      "%-18s %.2f tok/s in all, %.2f times one swarm session (grouped steps)\n",
      absl::StrCat(result.sessions, " sessions"), result.aggregate_tok_s,
      result.aggregate_ratio);
  absl::StrAppendFormat(
      &out,
      "%-18s %.2f tok/s in all, %.2f times one swarm session (a thread each)\n",
      "", result.threaded_aggregate_tok_s, result.threaded_aggregate_ratio);
  absl::StrAppendFormat(&out, "%-18s %.2f GB/s (%s)\n", "memory bandwidth",
                        result.bandwidth.bytes_per_s / 1e9,
                        result.bandwidth.Describe());
  absl::StrAppendFormat(
      &out,
      "%-18s %.1f MB of weights per token -> %.2f tok/s; local decode "
      "reaches %.3f of it\n",
      "decode bound",
      (result.block_weight_bytes + result.head_weight_bytes) / 1e6,
      result.bound_tok_s, result.bound_fraction);
  if (result.tokens_match) {
    absl::StrAppendFormat(&out,
                          "%-18s yes: every run picked the same %d tokens\n",
                          "tokens match", result.new_ids.size());
  } else {
    absl::StrAppendFormat(&out, "%-18s NO: %s\n", "tokens match",
                          result.mismatch);
  }
  return out;
}

}  // namespace pollen::bench
