// The `pollen` command as users and scripts run it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <dirent.h>

#include <fstream>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/support/swarm_fixture.h"
#include "tests/support/test_support.h"

namespace pollen::testing {
namespace {

constexpr char kReferenceText[] =
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the park. One day, she saw a big, red ball. She wanted to play "
    "with it,";

std::vector<int> Ids(const nlohmann::json& array) {
  return array.get<std::vector<int>>();
}

TEST(Cli, LocalSwarmPrintsReferenceStory) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "local-swarm", "--model", Stories260kDir(), "--nodes",
       "3", "--prompt", kStoriesPrompt, "--max-new-tokens", "48",
       "--temperature", "0"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  EXPECT_EQ(result.stdout_text, std::string(kReferenceText) + "\n");
}

TEST(Cli, LocalSwarmJsonHasReferenceIds) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "local-swarm", "--model", Stories260kDir(), "--nodes",
       "2", "--prompt", kStoriesPrompt, "--max-new-tokens", "48", "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);
  EXPECT_EQ(Ids(output["prompt_ids"]), kStoriesPromptIds);
  EXPECT_EQ(Ids(output["new_ids"]), kStoriesReferenceIds);
  EXPECT_EQ(output["route"].size(), 2u);
}

TEST(Cli, PushWithOneNodeWarns) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "local-swarm", "--model", Stories260kDir(), "--nodes",
       "1", "--prompt", kStoriesPrompt, "--max-new-tokens", "4", "--push"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  EXPECT_NE(result.stderr_text.find(
                "warning: --push has no effect with --nodes 1"),
            std::string::npos)
      << result.stderr_text;
}

// Bad values fail before the client waits for a swarm. Nothing listens on
// the peer below, so an error about that peer would mean a late check.
TEST(Cli, BadGenerationFlagsExitTwo) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--temperature=-1", "--temperature -1 is invalid"},
      {"--top-k=-3", "--top-k -3 is invalid"},
      {"--top-p=2", "--top-p 2 is outside (0, 1]"},
      {"--repetition-penalty=0", "--repetition-penalty 0 is invalid"},
      {"--max-new-tokens=0", "--max-new-tokens must be at least 1, got 0"},
      {"--max-new-tokens=5000",
       "--max-new-tokens 5000 leaves no room for a prompt in the model's 512"},
      {"--max-new-tokens=510",
       "--max-new-tokens 510 plus the 3 tokens of --prompt exceeds the "
       "model's 512 positions; at most 509 new tokens fit"},
      {"--max-new-tokens=abc", "invalid value 'abc' for --max-new-tokens"},
      {"--tempreature=0.5", "unknown flag --tempreature"},
      {"--model=/nonexistent/pollen-model", "--model /nonexistent/pollen-model:"},
      {"--initial-peers=nonsense", "--initial-peers: bootstrap peer 'nonsense'"},
      {"--initial-peers=nosuchhost.invalid:4222",
       "host 'nosuchhost.invalid' does not resolve"},
  };
  for (const auto& [flag, message] : cases) {
    SCOPED_TRACE(flag);
    const CommandResult result = RunCommand(
        {PollenBinary(), "generate", "--model", Stories260kDir(), "--prompt",
         "Hi", "--initial-peers", "127.0.0.1:9", flag});
    EXPECT_EQ(result.exit_code, 2);
    EXPECT_EQ(result.stdout_text, "");
    EXPECT_NE(result.stderr_text.find(message), std::string::npos)
        << result.stderr_text;
  }
}

// A bad --prompts-file fails before the client waits for a swarm.
TEST(Cli, BadPromptsFileExitsTwo) {
  TempDir dir;
  const std::string empty = dir.path() + "/empty.txt";
  const std::string long_prompt = dir.path() + "/long.txt";
  { std::ofstream(empty) << "\n\n"; }
  {
    std::ofstream file(long_prompt);
    file << "Hi\n";
    for (int i = 0; i < 600; ++i) file << "cat ";
    file << "\n";
  }
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--prompts-file", dir.path() + "/missing.txt"}, "cannot read it"},
      {{"--prompts-file", empty}, "has no prompt"},
      {{"--prompts-file", empty, "--prompt", "Hi"}, "not both"},
      {{"--prompts-file", long_prompt},
       "tokens of line 2 of --prompts-file leave no room for a new token"},
      {{"--prompts-file", dir.path()}, "is a folder"},
  };
  for (const auto& [flags, message] : cases) {
    SCOPED_TRACE(message);
    std::vector<std::string> argv = {PollenBinary(), "generate", "--model",
                                     Stories260kDir(), "--initial-peers",
                                     "127.0.0.1:9"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    const CommandResult result = RunCommand(argv);
    EXPECT_EQ(result.exit_code, 2);
    EXPECT_EQ(result.stdout_text, "");
    EXPECT_NE(result.stderr_text.find(message), std::string::npos)
        << result.stderr_text;
  }

  const CommandResult chat = RunCommand(
      {PollenBinary(), "chat", "--model", Stories260kDir(), "--initial-peers",
       "127.0.0.1:9", "--prompts-file", empty});
  EXPECT_EQ(chat.exit_code, 2);
  EXPECT_NE(chat.stderr_text.find("applies to generate only"), std::string::npos)
      << chat.stderr_text;
}

TEST(Cli, ChatRejectsBadMaxLength) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "chat", "--model", Stories260kDir(), "--initial-peers",
       "127.0.0.1:9", "--max-length", "-1"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_NE(result.stderr_text.find("--max-length -1 is outside 2..512"),
            std::string::npos)
      << result.stderr_text;
}

TEST(Cli, LocalSwarmRejectsBadDtypeFirst) {
  for (const char* flag : {"--dtype", "--quantize"}) {
    SCOPED_TRACE(flag);
    const CommandResult result = RunCommand(
        {PollenBinary(), "local-swarm", "--model", Stories260kDir(), "--nodes",
         "2", "--prompt", "Hi", flag, "int4"});
    EXPECT_EQ(result.exit_code, 2);
    EXPECT_NE(result.stderr_text.find(std::string("error: ") + flag + ":"),
              std::string::npos)
        << result.stderr_text;
    EXPECT_EQ(result.stderr_text.find("node 1 exited"), std::string::npos)
        << result.stderr_text;
  }
}

TEST(Cli, StrayArgumentIsNamed) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "generate", "--model", Stories260kDir(), "--prompt",
       "Hi", "--initial-peers", "127.0.0.1:9", "extra_word"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_NE(result.stderr_text.find("unexpected argument 'extra_word'"),
            std::string::npos)
      << result.stderr_text;
}

TEST(Cli, MissingPromptIsNoted) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "local-swarm", "--model", Stories260kDir(), "--nodes",
       "1", "--max-new-tokens", "4"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  EXPECT_NE(result.stderr_text.find("note: no --prompt given"),
            std::string::npos)
      << result.stderr_text;
  EXPECT_FALSE(result.stdout_text.empty());
}

TEST(Cli, PushOnMakeCheckpointWarns) {
  TempDir dir;
  const CommandResult result = RunCommand(
      {PollenBinary(), "make-checkpoint", "--shape", "test-tiny", "--out",
       dir.path() + "/tiny", "--push"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  EXPECT_NE(result.stderr_text.find(
                "warning: --push has no effect on pollen make-checkpoint"),
            std::string::npos)
      << result.stderr_text;
}

TEST(Cli, LocalSwarmWithPushMatchesReference) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "local-swarm", "--model", Stories260kDir(), "--nodes",
       "3", "--prompt", kStoriesPrompt, "--max-new-tokens", "48", "--push",
       "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);
  EXPECT_EQ(Ids(output["new_ids"]), kStoriesReferenceIds);
  EXPECT_EQ(output["route"].size(), 3u);
}

TEST(Cli, LocalSwarmRunsInt8Nodes) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "local-swarm", "--model", Stories260kDir(), "--nodes",
       "2", "--prompt", kStoriesPrompt, "--max-new-tokens", "16",
       "--quantize", "int8", "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);
  EXPECT_EQ(output["new_ids"].size(), 16u);
}

class CliSwarmTest : public ::testing::Test {
 protected:
  // Three hand-started nodes serving 0:2, 2:4 and 4:5.
  static void SetUpTestSuite() {
    swarm_ = new LocalSwarm();
    for (const auto& [start, end] :
         std::vector<std::pair<int, int>>{{0, 2}, {2, 4}, {4, 5}}) {
      auto index = swarm_->StartNode(Stories260kDir(), "stories260k", start, end);
      ASSERT_TRUE(index.ok()) << index.status();
    }
  }
  static void TearDownTestSuite() {
    delete swarm_;
    swarm_ = nullptr;
  }

  static std::vector<std::string> ClientArgs(const std::string& command) {
    return {PollenBinary(), command, "--model", Stories260kDir(),
            "--initial-peers", swarm_->peer()};
  }

  static LocalSwarm* swarm_;
};

LocalSwarm* CliSwarmTest::swarm_ = nullptr;

TEST_F(CliSwarmTest, GenerateJsonMatchesReference) {
  std::vector<std::string> argv = ClientArgs("generate");
  argv.insert(argv.end(), {"--prompt", kStoriesPrompt, "--max-new-tokens",
                           "48", "--temperature", "0", "--json"});
  const CommandResult result = RunCommand(argv);
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;

  const auto output = nlohmann::json::parse(result.stdout_text);
  EXPECT_EQ(Ids(output["prompt_ids"]), kStoriesPromptIds);
  EXPECT_EQ(Ids(output["new_ids"]), kStoriesReferenceIds);
  EXPECT_EQ(std::string(kStoriesPrompt) + output["text"].get<std::string>(),
            kReferenceText);
  EXPECT_GT(output["ms_per_token"].get<double>(), 0);
  EXPECT_EQ(output["finish_reason"], "max_new_tokens");
  ASSERT_EQ(output["route"].size(), 3u);
  EXPECT_EQ(output["route"][0]["blocks"], nlohmann::json({0, 2}));
  EXPECT_EQ(output["route"][1]["blocks"], nlohmann::json({2, 4}));
  EXPECT_EQ(output["route"][2]["blocks"], nlohmann::json({4, 5}));
  EXPECT_EQ(output["route"][1]["address"], swarm_->node(1).address);
}

TEST_F(CliSwarmTest, GenerateStreamsText) {
  std::vector<std::string> argv = ClientArgs("generate");
  argv.insert(argv.end(), {"--prompt", kStoriesPrompt, "--max-new-tokens", "48"});
  const CommandResult result = RunCommand(argv);
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  EXPECT_EQ(result.stdout_text, std::string(kReferenceText) + "\n");
}

// A file of prompts generates each as generate --prompt would, in the
// file's order, with empty lines skipped.
TEST_F(CliSwarmTest, GeneratePromptsFileMatchesSingles) {
  TempDir dir;
  const std::string path = dir.path() + "/prompts.txt";
  const std::vector<std::string> prompts = {kStoriesPrompt, "The little cat"};
  {
    std::ofstream file(path);
    file << prompts[0] << "\n \t\n" << prompts[1] << "\r\n";
  }

  std::vector<std::string> singles;
  for (const std::string& prompt : prompts) {
    std::vector<std::string> argv = ClientArgs("generate");
    argv.insert(argv.end(), {"--prompt", prompt, "--max-new-tokens", "16"});
    const CommandResult result = RunCommand(argv);
    ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
    singles.push_back(result.stdout_text);
  }

  std::vector<std::string> argv = ClientArgs("generate");
  argv.insert(argv.end(), {"--prompts-file", path, "--max-new-tokens", "16"});
  const CommandResult text = RunCommand(argv);
  ASSERT_EQ(text.exit_code, 0) << text.stderr_text;
  EXPECT_EQ(text.stdout_text, singles[0] + singles[1]);

  argv.push_back("--json");
  const CommandResult json = RunCommand(argv);
  ASSERT_EQ(json.exit_code, 0) << json.stderr_text;
  const std::vector<std::string> lines =
      absl::StrSplit(json.stdout_text, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u);
  const auto first = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(Ids(first["prompt_ids"]), kStoriesPromptIds);
  EXPECT_EQ(Ids(first["new_ids"]),
            std::vector<int>(kStoriesReferenceIds.begin(),
                             kStoriesReferenceIds.begin() + 16));
  const auto second = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(prompts[1] + second["text"].get<std::string>() + "\n", singles[1]);
}

TEST_F(CliSwarmTest, ChatJsonPrintsOneObjectPerTurn) {
  std::vector<std::string> argv = ClientArgs("chat");
  argv.insert(argv.end(), {"--max-new-tokens", "16", "--json", "--max-length", "128"});
  const CommandResult result =
      RunCommand(argv, std::string(kStoriesPrompt) + "\nThe dog\n");
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;

  const std::vector<std::string> lines =
      absl::StrSplit(result.stdout_text, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << result.stdout_text;
  const auto first = nlohmann::json::parse(lines[0]);
  const auto second = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(Ids(first["new_ids"]),
            std::vector<int>(kStoriesReferenceIds.begin(),
                             kStoriesReferenceIds.begin() + 16));
  EXPECT_EQ(second["new_ids"].size(), 16u);
  for (const char* key : {"prompt_ids", "new_ids", "text", "route",
                          "ms_per_token", "finish_reason"}) {
    EXPECT_TRUE(second.contains(key)) << key;
  }
}

TEST_F(CliSwarmTest, StatusJsonListsEveryBlock) {
  std::vector<std::string> argv = {PollenBinary(), "status", "--initial-peers",
                                   swarm_->peer(), "--json"};
  const CommandResult result = RunCommand(argv);
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  const auto output = nlohmann::json::parse(result.stdout_text);

  const nlohmann::json* model = nullptr;
  for (const auto& entry : output["models"]) {
    if (entry["model_id"] == "stories260k") model = &entry;
  }
  ASSERT_NE(model, nullptr) << result.stdout_text;
  EXPECT_EQ((*model)["num_blocks"], 5);
  EXPECT_EQ((*model)["nodes"].size(), 3u);
  EXPECT_TRUE((*model)["unserved_blocks"].empty());
  ASSERT_EQ((*model)["blocks"].size(), 5u);
  for (const auto& block : (*model)["blocks"]) {
    EXPECT_EQ(block["nodes"].size(), 1u) << block.dump();
  }
  const auto& node = (*model)["nodes"][0];
  for (const char* key : {"name", "address", "blocks", "state",
                          "cache_tokens_left", "age_s"}) {
    EXPECT_TRUE(node.contains(key)) << key;
  }
  EXPECT_EQ(node["state"], "online");
  EXPECT_EQ(node["dtype"], "float32");
  EXPECT_EQ(node["quantization"], "none");
}

TEST_F(CliSwarmTest, StatusTextShowsBlocks) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "status", "--initial-peers", swarm_->peer()});
  ASSERT_EQ(result.exit_code, 0) << result.stderr_text;
  EXPECT_NE(result.stdout_text.find("model stories260k (5 blocks)"),
            std::string::npos) << result.stdout_text;
  EXPECT_NE(result.stdout_text.find("block 4:"), std::string::npos);
}

TEST_F(CliSwarmTest, GenerateRejectsBadWaits) {
  for (const auto& [flag, value, text] :
       {std::make_tuple("--discovery-wait-s", "-1", "discovery wait -1s"),
        std::make_tuple("--step-timeout-s", "0", "step timeout 0")}) {
    std::vector<std::string> argv = ClientArgs("generate");
    argv.insert(argv.end(), {"--prompt", "Hi", flag, value});
    const CommandResult result = RunCommand(argv);
    EXPECT_EQ(result.exit_code, 2) << flag;
    EXPECT_NE(result.stderr_text.find(text), std::string::npos)
        << result.stderr_text;
  }
}

// Sampling without --seed draws a new seed each run and names it, and
// passing that seed repeats the output.
TEST(Cli, SampledGenerateNamesItsSeed) {
  // A swarm of its own: each client process joins the DHT while it runs,
  // and three more clients in the shared swarm made its status tests flaky.
  LocalSwarm swarm;
  ASSERT_TRUE(swarm.StartNode(Stories260kDir(), "stories260k", 0, 5).ok());
  std::vector<std::string> argv = {PollenBinary(), "generate", "--model",
                                   Stories260kDir(), "--initial-peers",
                                   swarm.peer()};
  argv.insert(argv.end(), {"--prompt", kStoriesPrompt, "--max-new-tokens",
                           "16", "--temperature", "1", "--json"});
  const CommandResult first = RunCommand(argv);
  ASSERT_EQ(first.exit_code, 0) << first.stderr_text;
  const CommandResult second = RunCommand(argv);
  ASSERT_EQ(second.exit_code, 0) << second.stderr_text;

  const std::string prefix = "note: sampling with --seed ";
  auto seed_of = [&prefix](const std::string& stderr_text) {
    const size_t start = stderr_text.find(prefix);
    if (start == std::string::npos) return std::string();
    const size_t end = stderr_text.find(';', start);
    return stderr_text.substr(start + prefix.size(), end - start - prefix.size());
  };
  const std::string seed = seed_of(first.stderr_text);
  ASSERT_FALSE(seed.empty()) << first.stderr_text;
  EXPECT_NE(seed_of(second.stderr_text), seed);

  argv.insert(argv.end(), {"--seed", seed});
  const CommandResult repeated = RunCommand(argv);
  ASSERT_EQ(repeated.exit_code, 0) << repeated.stderr_text;
  EXPECT_EQ(seed_of(repeated.stderr_text), "");
  EXPECT_EQ(nlohmann::json::parse(repeated.stdout_text)["new_ids"],
            nlohmann::json::parse(first.stdout_text)["new_ids"]);
}

// On a swarm of its own, like SampledGenerateNamesItsSeed.
TEST(Cli, FullChatSaysWhatToDo) {
  LocalSwarm swarm;
  ASSERT_TRUE(swarm.StartNode(Stories260kDir(), "stories260k", 0, 5).ok());
  std::vector<std::string> argv = {PollenBinary(), "chat", "--model",
                                   Stories260kDir(), "--initial-peers",
                                   swarm.peer()};
  argv.insert(argv.end(), {"--max-new-tokens", "8", "--max-length", "24"});
  const CommandResult result =
      RunCommand(argv, std::string(kStoriesPrompt) + "\nThe dog\nThe cat\n");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.stderr_text.find("positions and cannot take"),
            std::string::npos)
      << result.stderr_text;
  EXPECT_NE(result.stderr_text.find(
                "note: the conversation is full; start a new chat, or raise "
                "--max-length"),
            std::string::npos)
      << result.stderr_text;

  // A first line longer than the whole conversation.
  std::string long_line;
  for (int i = 0; i < 12; ++i) long_line += std::string(kStoriesPrompt) + " ";
  const CommandResult too_long = RunCommand(argv, long_line + "\n");
  EXPECT_EQ(too_long.exit_code, 1);
  EXPECT_NE(too_long.stderr_text.find(
                "note: this line alone does not fit the conversation; "
                "shorten it, or raise --max-length"),
            std::string::npos)
      << too_long.stderr_text;

  // A reply cut short by the conversation's length: 5 prompt positions and
  // 8 new tokens, then 3 more and only 4 of the 8 new tokens fit in 20.
  std::vector<std::string> short_argv = {
      PollenBinary(), "chat", "--model", Stories260kDir(), "--initial-peers",
      swarm.peer(), "--max-new-tokens", "8", "--max-length", "20", "--json"};
  const CommandResult cut =
      RunCommand(short_argv, std::string(kStoriesPrompt) + "\nThe dog\n");
  ASSERT_EQ(cut.exit_code, 0) << cut.stderr_text;
  const std::vector<std::string> lines =
      absl::StrSplit(cut.stdout_text, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << cut.stdout_text;
  EXPECT_EQ(nlohmann::json::parse(lines[0])["finish_reason"], "max_new_tokens");
  const auto second = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(second["finish_reason"], "max_length");
  EXPECT_EQ(second["new_ids"].size(), 4u);
  EXPECT_NE(cut.stderr_text.find("note: the reply stopped after 4 tokens"),
            std::string::npos)
      << cut.stderr_text;
}

// Checks that every record under block 0 of `model_id` has state OFFLINE.
void ExpectWithdrawn(LocalSwarm& swarm, const std::string& model_id) {
  auto records = swarm.registry().FetchBlock(model_id, 0, absl::Seconds(5));
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_FALSE(records->empty());
  for (const v1::NodeRecord& record : *records) {
    EXPECT_EQ(record.state(), v1::NODE_STATE_OFFLINE);
  }
}

TEST(Cli, SigtermWithdrawsNode) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), "withdraw", 0, 5);
  ASSERT_TRUE(index.ok()) << index.status();

  swarm.node(*index).process.Signal(SIGTERM);
  EXPECT_EQ(swarm.node(*index).process.Wait(absl::Seconds(20)), 0)
      << swarm.node(*index).process.LogTail();

  ExpectWithdrawn(swarm, "withdraw");
}

// Returns a thread of process `pid`, other than its main thread, that does
// not block `signal_number`, or -1 when there is none.
pid_t ThreadTakingSignal(pid_t pid, int signal_number) {
  const std::string tasks = absl::StrCat("/proc/", pid, "/task");
  DIR* dir = opendir(tasks.c_str());
  if (dir == nullptr) return -1;
  pid_t found = -1;
  while (const dirent* entry = readdir(dir)) {
    const pid_t tid = static_cast<pid_t>(std::atoi(entry->d_name));
    if (tid <= 0 || tid == pid) continue;
    std::ifstream status(absl::StrCat(tasks, "/", tid, "/status"));
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("SigBlk:", 0) != 0) continue;
      const uint64_t blocked = std::stoull(line.substr(7), nullptr, 16);
      if ((blocked & (uint64_t{1} << (signal_number - 1))) == 0) found = tid;
    }
    if (found > 0) break;
  }
  closedir(dir);
  return found;
}

// Libraries may start threads before the node blocks its stop signals
// (OpenBLAS does, as the program loads), and the kernel may hand SIGTERM
// to one of them.
TEST(Cli, SigtermToAnyThreadWithdrawsNode) {
  LocalSwarm swarm;
  auto index = swarm.StartNode(Stories260kDir(), "withdraw", 0, 5);
  ASSERT_TRUE(index.ok()) << index.status();
  const pid_t pid = swarm.node(*index).process.pid();
  const pid_t tid = ThreadTakingSignal(pid, SIGTERM);
  if (tid < 0) GTEST_SKIP() << "every thread of the node blocks SIGTERM";

  ASSERT_EQ(syscall(SYS_tgkill, pid, tid, SIGTERM), 0);
  EXPECT_EQ(swarm.node(*index).process.Wait(absl::Seconds(20)), 0)
      << swarm.node(*index).process.LogTail();
  ExpectWithdrawn(swarm, "withdraw");
}

TEST(Cli, HelpListsFlags) {
  for (const char* request : {"--help", "help"}) {
    SCOPED_TRACE(request);
    const CommandResult result = RunCommand({PollenBinary(), request});
    EXPECT_EQ(result.exit_code, 0);
    EXPECT_NE(result.stdout_text.find("--max-new-tokens"), std::string::npos)
        << result.stdout_text;
    EXPECT_NE(result.stdout_text.find("local-swarm"), std::string::npos)
        << result.stdout_text;
  }
}

TEST_F(CliSwarmTest, FailedGeneratePrintsNothingOnStdout) {
  std::vector<std::string> argv = ClientArgs("generate");
  // Valid flags, but no node serves this model id: the client finds out
  // only after joining the swarm.
  argv.insert(argv.end(), {"--prompt", kStoriesPrompt, "--model-id",
                           "served-by-nobody", "--discovery-wait-s", "1"});
  const CommandResult result = RunCommand(argv);
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_EQ(result.stdout_text, "");
  EXPECT_NE(result.stderr_text.find("no usable node serves blocks"),
            std::string::npos)
      << result.stderr_text;
}

TEST(Cli, UnknownCommandShowsUsage) {
  const CommandResult result = RunCommand({PollenBinary(), "fly"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_NE(result.stderr_text.find("unknown command 'fly'"), std::string::npos);
}

TEST(Cli, NodeOnTakenPortFailsClearly) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(listen(listener, 1), 0);
  socklen_t length = sizeof(address);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length), 0);
  const int port = ntohs(address.sin_port);

  const CommandResult result = RunCommand(
      {PollenBinary(), "node", "--model", Stories260kDir(), "--blocks", "0:5",
       "--host", "127.0.0.1", "--port", std::to_string(port)});
  close(listener);

  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.stderr_text.find(absl::StrCat(
                "cannot listen on 127.0.0.1:", port, ": Address already in use")),
            std::string::npos)
      << result.stderr_text;
  // gRPC's own error dump stays out of the output.
  EXPECT_EQ(result.stderr_text.find("chttp2"), std::string::npos)
      << result.stderr_text;
}

TEST(Cli, NodeRejectsImpossibleValues) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--port", "70000"}, "ports must be in 0..65535, got --port 70000"},
      {{"--num-blocks", "7"}, "--num-blocks 7 exceeds the 5 blocks"},
      {{"--host", "999.1.1.1"}, "--host '999.1.1.1' does not resolve"},
      {{"--min-balance-gain", "0.5"},
       "--min-balance-gain is a speed-up factor and must be at least 1"},
      {{"--threads", "-2"}, "--threads must be 0 (libtorch's default)"},
      {{"--device", "tpu"}, "unknown device 'tpu'; use cpu, cuda or cuda:N"},
      {{"--dtype", "fp16"}, "--dtype fp16 needs a GPU"},
  };
  for (const auto& [flags, message] : cases) {
    SCOPED_TRACE(flags[0]);
    std::vector<std::string> argv = {PollenBinary(), "node", "--model",
                                     Stories260kDir()};
    argv.insert(argv.end(), flags.begin(), flags.end());
    const CommandResult result = RunCommand(argv);
    EXPECT_EQ(result.exit_code, 2);
    EXPECT_NE(result.stderr_text.find(message), std::string::npos)
        << result.stderr_text;
  }
}

TEST(Cli, NodeRejectsMalformedBlocks) {
  const CommandResult result = RunCommand(
      {PollenBinary(), "node", "--model", Stories260kDir(), "--blocks", "two"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_NE(result.stderr_text.find("--blocks must be START:END"), std::string::npos);
}

TEST(Cli, NodeRejectsContradictoryNumBlocks) {
  const CommandResult result =
      RunCommand({PollenBinary(), "node", "--model", Stories260kDir(),
                  "--blocks", "0:2", "--num-blocks", "3"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_NE(result.stderr_text.find("--num-blocks 3 contradicts --blocks 0:2"),
            std::string::npos)
      << result.stderr_text;
}

}  // namespace
}  // namespace pollen::testing
