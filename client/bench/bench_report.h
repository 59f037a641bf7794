// Output of `pollen bench`: a table for people and a JSON object for
// scripts.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "client/bench/bench_runner.h"

namespace pollen::bench {

// Returns one object with local_decode_tok_s, swarm_decode_tok_s,
// decode_ratio, local_prefill_tok_s, swarm_prefill_tok_s, prefill_ratio,
// hop_overhead_ms, sessions, aggregate_tok_s, aggregate_ratio,
// bandwidth_gb_s (10^9 bytes per second) and bound_fraction. It also
// contains threaded_aggregate_tok_s and threaded_aggregate_ratio, the
// setup (model_id, num_blocks, dtype, threads, nodes,
// prompt_tokens, new_tokens, repetitions), tokens_match, mismatch (empty
// when the tokens match), new_ids, weight_bytes, bound_tok_s and
// bandwidth_method.
nlohmann::json BenchResultToJson(const BenchResult& result);

// A readable table of the same numbers, one fact per line, ending in a
// newline.
std::string FormatBenchReport(const BenchResult& result);

}  // namespace pollen::bench
