// `pollen status`: what the swarm serves, block by block.
#include <algorithm>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "client/cli/commands.h"
#include "common/dht_registry.h"
#include "common/logging.h"
#include "scheduler/route.h"

namespace pollen::cli {
namespace {

constexpr absl::Duration kFetchTimeout = absl::Seconds(5);
// Pause between lookups of an index that came back empty.
constexpr absl::Duration kRefetchPause = absl::Milliseconds(500);

std::string StateName(v1::NodeState state) {
  switch (state) {
    case v1::NODE_STATE_JOINING:
      return "joining";
    case v1::NODE_STATE_ONLINE:
      return "online";
    case v1::NODE_STATE_OFFLINE:
      return "offline";
    default:
      return "unknown";
  }
}

nlohmann::json NodeToJson(const v1::NodeRecord& record, int64_t now_ms) {
  nlohmann::json next_rtt_ms = nlohmann::json::object();
  for (const auto& [node_id, rtt_ms] : record.next_rtt_ms()) {
    next_rtt_ms[node_id] = rtt_ms;
  }
  return {{"node_id", record.node_id()},
          {"name", record.public_name()},
          {"address", record.address()},
          {"blocks", {record.blocks().start(), record.blocks().end()}},
          {"state", StateName(record.state())},
          {"cache_tokens_left", record.cache_tokens_left()},
          {"throughput", record.throughput()},
          {"prefill_throughput", record.prefill_throughput()},
          {"device", record.device()},
          {"dtype", record.dtype()},
          // "none" like --quantize; records leave the field empty for it.
          {"quantization",
           record.quantization().empty() ? "none" : record.quantization()},
          {"next_rtt_ms", next_rtt_ms},
          {"version", record.version()},
          {"age_s", (now_ms - record.announced_ms()) / 1000.0}};
}

// Keeps the newest record of each node: a node announces one span per
// model, so an older record of another span is out of date.
std::vector<v1::NodeRecord> NewestPerNode(std::vector<v1::NodeRecord> records) {
  std::map<std::string, v1::NodeRecord> newest;
  for (v1::NodeRecord& record : records) {
    auto [it, inserted] = newest.try_emplace(record.node_id(), record);
    if (!inserted && record.announced_ms() > it->second.announced_ms()) {
      it->second = std::move(record);
    }
  }
  std::vector<v1::NodeRecord> result;
  for (auto& [node_id, record] : newest) result.push_back(std::move(record));
  return result;
}

bool Covers(const v1::NodeRecord& record, int block) {
  return static_cast<int>(record.blocks().start()) <= block &&
         block < static_cast<int>(record.blocks().end());
}

// Collects one model's view: its nodes and, per block, who serves it and
// their total decode throughput. `index` holds the model index's records,
// which are the same signed records as under the block keys. They fill in a
// block whose lookup came back without its nodes, which a DHT that clients
// have just left does now and then.
nlohmann::json DescribeModel(DhtRegistry& registry, const std::string& model_id,
                             int num_blocks, int64_t now_ms,
                             const std::vector<v1::NodeRecord>& index) {
  nlohmann::json model = {{"model_id", model_id}, {"num_blocks", num_blocks}};
  auto fetched = registry.FetchSpan(model_id, 0, num_blocks, kFetchTimeout);
  std::vector<v1::NodeRecord> found;
  if (fetched.ok()) found = *std::move(fetched);
  for (const v1::NodeRecord& record : index) {
    if (record.model_id() == model_id) found.push_back(record);
  }
  if (!fetched.ok() && found.empty()) {
    model["error"] = std::string(fetched.status().message());
    return model;
  }
  const std::vector<v1::NodeRecord> records = NewestPerNode(std::move(found));

  nlohmann::json nodes = nlohmann::json::array();
  nlohmann::json blocks = nlohmann::json::array();
  std::vector<int> unserved;
  for (const v1::NodeRecord& record : records) {
    nodes.push_back(NodeToJson(record, now_ms));
  }
  for (int block = 0; block < num_blocks; ++block) {
    nlohmann::json serving = nlohmann::json::array();
    bool online = false;
    double throughput = 0;
    for (const v1::NodeRecord& record : records) {
      if (!Covers(record, block)) continue;
      serving.push_back(record.node_id());
      if (record.state() == v1::NODE_STATE_ONLINE) {
        online = true;
        throughput += std::max(0.0, record.throughput());
      }
    }
    if (!online) unserved.push_back(block);
    blocks.push_back(
        {{"block", block}, {"nodes", serving}, {"throughput", throughput}});
  }
  model["nodes"] = nodes;
  model["blocks"] = blocks;
  model["unserved_blocks"] = unserved;
  return model;
}

// "float32", or "bfloat16+int8" for int8 weights computing in bfloat16.
std::string DtypeLabel(const nlohmann::json& node) {
  const std::string dtype = node["dtype"].get<std::string>();
  const std::string quantization = node["quantization"].get<std::string>();
  return quantization == "none" ? dtype : dtype + "+" + quantization;
}

// One line per node: "name address blocks a:b state ...".
void PrintNode(const nlohmann::json& node,
               const std::map<std::string, nlohmann::json>& nodes) {
  // The name defaults to the address, so print the address once then. The
  // node id prefix distinguishes nodes behind one address.
  const std::string address = node["address"].get<std::string>();
  const std::string name = node["name"].get<std::string>();
  const std::string label =
      name.empty() || name == address ? address : name + "  " + address;
  std::cout << absl::StrFormat(
      "    %s  %s  blocks %d:%d  %s  %d cache tokens left  %.1f steps/s, "
      "%.1f prefill tokens/s  %s %s  %.0fs ago\n",
      node["node_id"].get<std::string>().substr(0, 8), label,
      node["blocks"][0].get<int>(), node["blocks"][1].get<int>(),
      node["state"].get<std::string>(),
      node["cache_tokens_left"].get<int64_t>(),
      node["throughput"].get<double>(),
      node["prefill_throughput"].get<double>(),
      node["device"].get<std::string>(), DtypeLabel(node),
      node["age_s"].get<double>());
  if (node["next_rtt_ms"].empty()) return;

  // Name next-hop nodes when their records are known.
  std::vector<std::string> hops;
  for (const auto& [node_id, rtt_ms] : node["next_rtt_ms"].items()) {
    auto known = nodes.find(node_id);
    const std::string name = known != nodes.end()
                                 ? known->second["name"].get<std::string>()
                                 : node_id.substr(0, 8);
    hops.push_back(absl::StrFormat("%s %.1f ms", name, rtt_ms.get<double>()));
  }
  std::cout << "      next hops: " << absl::StrJoin(hops, ", ") << "\n";
}

void PrintModel(const nlohmann::json& model) {
  std::cout << "model " << model["model_id"].get<std::string>() << " ("
            << model["num_blocks"].get<int>() << " blocks)\n";
  if (model.contains("error")) {
    std::cout << "  error: " << model["error"].get<std::string>() << "\n";
    return;
  }
  std::map<std::string, nlohmann::json> nodes;
  for (const auto& node : model["nodes"]) {
    nodes[node["node_id"].get<std::string>()] = node;
  }
  const auto unserved = model["unserved_blocks"].get<std::vector<int>>();
  for (const auto& block : model["blocks"]) {
    const int index = block["block"].get<int>();
    if (std::find(unserved.begin(), unserved.end(), index) != unserved.end()) {
      std::cout << "  block " << index << " not served\n";
    } else {
      std::cout << absl::StrFormat("  block %d: %.1f steps/s\n", index,
                                   block["throughput"].get<double>());
    }
    for (const auto& node_id : block["nodes"]) {
      const nlohmann::json& node = nodes[node_id.get<std::string>()];
      if (node["state"].get<std::string>() != "offline") PrintNode(node, nodes);
    }
  }
  if (!unserved.empty()) {
    std::cout << "  not served: blocks " << scheduler::FormatBlockList(unserved)
              << "\n";
  }

  // Nodes that announced their shutdown; their records expire within the
  // record TTL.
  std::vector<std::string> offline;
  for (const auto& [node_id, node] : nodes) {
    if (node["state"].get<std::string>() != "offline") continue;
    const std::string name = node["name"].get<std::string>();
    offline.push_back(absl::StrFormat(
        "%s (blocks %d:%d, %.0fs ago)",
        name.empty() ? node_id.substr(0, 8) : name,
        node["blocks"][0].get<int>(), node["blocks"][1].get<int>(),
        node["age_s"].get<double>()));
  }
  if (!offline.empty()) {
    std::cout << "  recently offline: " << absl::StrJoin(offline, ", ") << "\n";
  }
}

}  // namespace

int RunStatusCommand(const StatusCommandOptions& options) {
  if (options.initial_peers.empty()) {
    std::cerr << "error: pass --initial-peers HOST:PORT of a node in the swarm\n";
    return 2;
  }
  DhtOptions dht_options;
  dht_options.bootstrap = options.initial_peers;
  auto registry = DhtRegistry::Start(dht_options);
  if (!registry.ok()) {
    std::cerr << "error: " << registry.status().message() << "\n";
    return 1;
  }
  const absl::Status connected = (*registry)->WaitConnected(absl::Seconds(10));
  if (!connected.ok()) {
    std::cerr << "error: " << connected.message() << "\n";
    return 1;
  }
  // A lookup sometimes ends without the index after other clients joined
  // and left the swarm, so an empty index is fetched again until
  // kFetchTimeout has passed.
  // NOTE: in tests where clients joined and left every second, the index
  // stayed out of reach for the whole timeout about once in seven runs,
  // and status then reported no models. The cause inside the DHT is not
  // known; clients that left may still count among the closest peers.
  const absl::Time deadline = absl::Now() + kFetchTimeout;
  auto index = (*registry)->FetchModelIndex(kFetchTimeout);
  while (index.ok() && index->empty() && absl::Now() + kRefetchPause < deadline) {
    POLLEN_LOG_DEBUG("the model index lookup found no records; looking again");
    absl::SleepFor(kRefetchPause);
    index = (*registry)->FetchModelIndex(deadline - absl::Now());
  }
  if (!index.ok()) {
    std::cerr << "error: " << index.status().message() << "\n";
    return 1;
  }

  // The index contains one record per node, and each carries its model's
  // block count.
  std::map<std::string, int> models;
  for (const v1::NodeRecord& record : *index) {
    int& num_blocks = models[record.model_id()];
    num_blocks = std::max(num_blocks, static_cast<int>(record.num_blocks()));
  }
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  nlohmann::json output = {{"models", nlohmann::json::array()}};
  for (const auto& [model_id, num_blocks] : models) {
    output["models"].push_back(
        DescribeModel(**registry, model_id, num_blocks, now_ms, *index));
  }

  if (options.json) {
    std::cout << output.dump() << "\n";
    return 0;
  }
  if (models.empty()) std::cout << "no models announced in this swarm\n";
  for (const auto& model : output["models"]) PrintModel(model);
  return 0;
}

}  // namespace pollen::cli
