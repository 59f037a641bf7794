#include "client/tokenizer.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace pollen::client {
namespace {

using ::pollen::testing::kStoriesPrompt;
using ::pollen::testing::kStoriesPromptIds;
using ::pollen::testing::kStoriesReferenceIds;
using ::pollen::testing::Llama2TokenizerPath;
using ::pollen::testing::Stories260kDir;
using ::pollen::testing::TempDir;

std::unique_ptr<Tokenizer> LoadOrDie(const std::string& path) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::Load(path);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(tokenizer).value() : nullptr;
}

// Protobuf wire-format writers for hand-built SentencePiece models.
std::string Varint(uint64_t value) {
  std::string out;
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
  return out;
}

std::string VarintField(int number, uint64_t value) {
  return Varint(static_cast<uint64_t>(number) << 3) + Varint(value);
}

std::string BytesField(int number, const std::string& bytes) {
  return Varint((static_cast<uint64_t>(number) << 3) | 2) +
         Varint(bytes.size()) + bytes;
}

std::string FloatField(int number, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  std::string out = Varint((static_cast<uint64_t>(number) << 3) | 5);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(bits >> (8 * i)));
  return out;
}

// ModelProto.SentencePiece.Type values.
constexpr int kNormal = 1;
constexpr int kUnknown = 2;
constexpr int kControl = 3;
constexpr int kUserDefined = 4;
constexpr int kUnused = 5;

std::string Piece(const std::string& text, float score, int type) {
  return BytesField(1, BytesField(1, text) + FloatField(2, score) +
                           VarintField(3, type));
}

// A BPE model without byte fallback. Normalizer fields are left out, so the
// defaults apply: dummy prefix, extra whitespace removed.
//   0 <unk>  1 <s>  2 </s>  3 ▁  4 a  5 b  6 c  7 ab  8 ▁a  9 ▁ab
//   10 bc (unused)  11 <sep> (user-defined)  12 aa
std::string ToyModel() {
  return Piece("<unk>", 0, kUnknown) + Piece("<s>", 0, kControl) +
         Piece("</s>", 0, kControl) + Piece("\xE2\x96\x81", -5, kNormal) +
         Piece("a", -6, kNormal) + Piece("b", -6, kNormal) +
         Piece("c", -6, kNormal) + Piece("ab", -1, kNormal) +
         Piece("\xE2\x96\x81" "a", -2, kNormal) +
         Piece("\xE2\x96\x81" "ab", -0.5f, kNormal) +
         Piece("bc", 0, kUnused) + Piece("<sep>", 0, kUserDefined) +
         Piece("aa", -1, kNormal) +
         BytesField(2, VarintField(3, 2));  // trainer_spec.model_type = BPE
}

// Writes `serialized` to a file in `dir` and loads it.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSerialized(
    const TempDir& dir, const std::string& serialized) {
  const std::string path = dir.path() + "/tokenizer.model";
  std::ofstream(path, std::ios::binary) << serialized;
  return Tokenizer::Load(path);
}

class Llama2TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokenizer_ = LoadOrDie(Llama2TokenizerPath());
    ASSERT_NE(tokenizer_, nullptr);
  }

  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(Llama2TokenizerTest, SpecialIds) {
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_id(), 2);
  EXPECT_EQ(tokenizer_->vocab_size(), 32000);
}

TEST_F(Llama2TokenizerTest, EncodesHelloWorld) {
  EXPECT_EQ(tokenizer_->Encode("Hello world", /*add_bos=*/false),
            (std::vector<int>{15043, 3186}));
}

TEST_F(Llama2TokenizerTest, EncodesSentence) {
  EXPECT_EQ(tokenizer_->Encode("The capital of France is", /*add_bos=*/false),
            (std::vector<int>{450, 7483, 310, 3444, 338}));
}

TEST_F(Llama2TokenizerTest, PrependsBos) {
  EXPECT_EQ(tokenizer_->Encode("The capital of France is", /*add_bos=*/true),
            (std::vector<int>{1, 450, 7483, 310, 3444, 338}));
}

TEST_F(Llama2TokenizerTest, EncodesEmptyText) {
  EXPECT_TRUE(tokenizer_->Encode("", /*add_bos=*/false).empty());
  EXPECT_EQ(tokenizer_->Encode("", /*add_bos=*/true), (std::vector<int>{1}));
}

TEST_F(Llama2TokenizerTest, RoundTripsChinese) {
  const std::string text = "你好，世界。今天天气很好";
  EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode(text, false)), text);
  EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode(text, true)), text);
}

TEST_F(Llama2TokenizerTest, RoundTripsEmoji) {
  const std::string text = "I like 🦙 and 🐝";
  EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode(text, false)), text);
  EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode(text, true)), text);
}

TEST_F(Llama2TokenizerTest, InvalidUtf8BecomesReplacementCharacter) {
  EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode("a\xFF" "b", false)),
            "a\xEF\xBF\xBD" "b");
}

TEST_F(Llama2TokenizerTest, DecodeSkipsControlIds) {
  EXPECT_EQ(tokenizer_->Decode({1, 15043, 3186, 2}), "Hello world");
}

TEST_F(Llama2TokenizerTest, DecodeSkipsOutOfRangeIds) {
  EXPECT_EQ(tokenizer_->Decode({-1, 15043, 32000, 3186, 1 << 30}),
            "Hello world");
}

TEST_F(Llama2TokenizerTest, ByteValues) {
  // Llama 2 stores the 256 byte-fallback pieces <0x00>..<0xFF> at ids 3..258.
  EXPECT_EQ(tokenizer_->ByteValue(3), 0x00);
  EXPECT_EQ(tokenizer_->ByteValue(3 + 0xE4), 0xE4);
  EXPECT_EQ(tokenizer_->ByteValue(258), 0xFF);
  EXPECT_FALSE(tokenizer_->ByteValue(1).has_value());
  EXPECT_FALSE(tokenizer_->ByteValue(15043).has_value());
  EXPECT_FALSE(tokenizer_->ByteValue(-5).has_value());
  EXPECT_FALSE(tokenizer_->ByteValue(32000).has_value());
}

TEST(Tokenizer, StoriesPrompt) {
  const std::unique_ptr<Tokenizer> tokenizer =
      LoadOrDie(Stories260kDir() + "/tokenizer.model");
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->vocab_size(), 512);
  EXPECT_EQ(tokenizer->Encode("Once upon a time", /*add_bos=*/true),
            (std::vector<int>{1, 403, 407, 261, 378}));
  EXPECT_EQ(tokenizer->Encode(kStoriesPrompt, /*add_bos=*/true),
            kStoriesPromptIds);
}

TEST(Tokenizer, StoriesReferenceText) {
  const std::unique_ptr<Tokenizer> tokenizer =
      LoadOrDie(Stories260kDir() + "/tokenizer.model");
  ASSERT_NE(tokenizer, nullptr);
  std::vector<int> ids = kStoriesPromptIds;
  ids.insert(ids.end(), kStoriesReferenceIds.begin(),
             kStoriesReferenceIds.end());
  EXPECT_EQ(tokenizer->Decode(ids),
            "Once upon a time, there was a little girl named Lily. She loved "
            "to play outside in the park. One day, she saw a big, red ball. "
            "She wanted to play with it,");
}

class ToyTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
        LoadSerialized(dir_, ToyModel());
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(tokenizer).value();
  }

  TempDir dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

// The expected ids below match libsentencepiece 0.1.97 on the same model.

TEST_F(ToyTokenizerTest, MergesHighestScoreFirst) {
  // "▁ab": ab (-1) beats ▁a (-2), then ▁ab (-0.5) joins ▁ and ab.
  EXPECT_EQ(tokenizer_->Encode("ab", false), (std::vector<int>{9}));
}

TEST_F(ToyTokenizerTest, MergesLeftmostOnTie) {
  // "▁aaa": both aa pairs score -1, and the left one merges.
  EXPECT_EQ(tokenizer_->Encode("aaa", false), (std::vector<int>{3, 12, 4}));
}

TEST_F(ToyTokenizerTest, SplitsUnusedPieces) {
  // bc is a merge step but unused, so it is emitted as b and c.
  EXPECT_EQ(tokenizer_->Encode("bc", false), (std::vector<int>{3, 5, 6}));
}

TEST_F(ToyTokenizerTest, KeepsUserDefinedPiecesWhole) {
  EXPECT_EQ(tokenizer_->Encode("a<sep>b", false),
            (std::vector<int>{8, 11, 5}));
}

TEST_F(ToyTokenizerTest, MergesUnknownRun) {
  EXPECT_EQ(tokenizer_->Encode("xyz", false), (std::vector<int>{3, 0}));
  EXPECT_EQ(tokenizer_->Decode({3, 0}), " \xE2\x81\x87 ");
}

TEST_F(ToyTokenizerTest, RemovesExtraWhitespace) {
  EXPECT_EQ(tokenizer_->Encode("  a  b ", false), (std::vector<int>{8, 3, 5}));
  EXPECT_TRUE(tokenizer_->Encode("   ", false).empty());
  EXPECT_EQ(tokenizer_->Decode({3, 3, 4}), "a");
}

TEST_F(ToyTokenizerTest, SpecialIds) {
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_id(), 2);
  EXPECT_EQ(tokenizer_->vocab_size(), 13);
  EXPECT_FALSE(tokenizer_->ByteValue(4).has_value());
}

TEST(Tokenizer, UnigramModelIsInvalidArgument) {
  TempDir dir;
  const std::string model =
      Piece("<unk>", 0, kUnknown) + BytesField(2, VarintField(3, 1));
  const absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      LoadSerialized(dir, model);
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find("UNIGRAM"),
            absl::string_view::npos)
      << tokenizer.status();
}

TEST(Tokenizer, CharsMapIsInvalidArgument) {
  TempDir dir;
  const std::string model = ToyModel() +
                            BytesField(3, BytesField(1, "nmt_nfkc") +
                                              BytesField(2, "charsmap"));
  const absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      LoadSerialized(dir, model);
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find("nmt_nfkc"),
            absl::string_view::npos)
      << tokenizer.status();
}

TEST(Tokenizer, MissingUnknownPieceIsInvalidArgument) {
  TempDir dir;
  const std::string model =
      Piece("a", 0, kNormal) + BytesField(2, VarintField(3, 2));
  EXPECT_EQ(LoadSerialized(dir, model).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Tokenizer, MissingBytePiecesIsInvalidArgument) {
  TempDir dir;
  const std::string model =
      ToyModel() + BytesField(2, VarintField(35, 1));  // byte_fallback
  const absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      LoadSerialized(dir, model);
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find("byte_fallback"),
            absl::string_view::npos)
      << tokenizer.status();
}

TEST(Tokenizer, TruncatedFileIsInvalidArgument) {
  std::ifstream file(Llama2TokenizerPath(), std::ios::binary);
  const std::string contents((std::istreambuf_iterator<char>(file)),
                             std::istreambuf_iterator<char>());
  ASSERT_GT(contents.size(), 1000u);

  TempDir dir;
  const absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      LoadSerialized(dir, contents.substr(0, contents.size() / 2));
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find("byte"), absl::string_view::npos)
      << tokenizer.status();
}

TEST(Tokenizer, MissingFileIsNotFound) {
  const std::string path = Stories260kDir() + "/no-such-tokenizer.model";
  const absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      Tokenizer::Load(path);
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(tokenizer.status().message().find(path), absl::string_view::npos)
      << tokenizer.status();
}

TEST(Tokenizer, GarbageFileIsInvalidArgument) {
  TempDir dir;
  const std::string path = dir.path() + "/tokenizer.model";
  std::ofstream(path) << "this is not a SentencePiece model";

  const absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      Tokenizer::Load(path);
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find(path), absl::string_view::npos)
      << tokenizer.status();
}

TEST(Tokenizer, DirectoryIsInvalidArgument) {
  TempDir dir;
  const absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      Tokenizer::Load(dir.path());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pollen::client
