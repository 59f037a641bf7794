#include "client/text_stream.h"

#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "client/tokenizer.h"
#include "tests/support/test_support.h"

namespace pollen::client {
namespace {

using ::pollen::testing::kStoriesPromptIds;
using ::pollen::testing::kStoriesReferenceIds;
using ::pollen::testing::Llama2TokenizerPath;
using ::pollen::testing::Stories260kDir;

constexpr char kReplacementCharacter[] = "\xEF\xBF\xBD";  // U+FFFD

// Checks `text` against the UTF-8 encoding rules of RFC 3629: no overlong
// forms, no surrogates, nothing above U+10FFFF, no truncated sequence.
bool IsValidUtf8(const std::string& text) {
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char lead = static_cast<unsigned char>(text[i]);
    size_t length;
    unsigned int code_point;
    if (lead < 0x80) {
      length = 1;
      code_point = lead;
    } else if (lead >= 0xC2 && lead < 0xE0) {
      length = 2;
      code_point = lead & 0x1F;
    } else if (lead >= 0xE0 && lead < 0xF0) {
      length = 3;
      code_point = lead & 0x0F;
    } else if (lead >= 0xF0 && lead < 0xF5) {
      length = 4;
      code_point = lead & 0x07;
    } else {
      return false;
    }
    if (i + length > text.size()) return false;

    for (size_t k = 1; k < length; ++k) {
      const unsigned char byte = static_cast<unsigned char>(text[i + k]);
      if ((byte & 0xC0) != 0x80) return false;
      code_point = (code_point << 6) | (byte & 0x3F);
    }
    const unsigned int min_code_point[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code_point < min_code_point[length]) return false;
    if (code_point >= 0xD800 && code_point <= 0xDFFF) return false;
    if (code_point > 0x10FFFF) return false;
    i += length;
  }
  return true;
}

std::unique_ptr<Tokenizer> LoadOrDie(const std::string& path) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::Load(path);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(tokenizer).value() : nullptr;
}

// Pushes `generated` one id at a time, checks that every piece is valid
// UTF-8 and that text() tracks the pieces, and returns the concatenation of
// the pieces and the final Flush.
std::string StreamAll(const Tokenizer& tokenizer,
                      const std::vector<int>& context,
                      const std::vector<int>& generated) {
  TextStream stream(tokenizer, context);
  std::string concatenation;
  for (size_t i = 0; i < generated.size(); ++i) {
    const std::string piece = stream.Push(generated[i]);
    EXPECT_TRUE(IsValidUtf8(piece))
        << "piece after id " << generated[i] << " at index " << i;
    concatenation += piece;
  }
  const std::string rest = stream.Flush();
  EXPECT_TRUE(IsValidUtf8(rest)) << "flushed text";
  concatenation += rest;
  EXPECT_EQ(stream.text(), concatenation);
  return concatenation;
}

TEST(IsValidUtf8, RejectsBrokenSequences) {
  EXPECT_TRUE(IsValidUtf8("plain 你好 🦙"));
  EXPECT_FALSE(IsValidUtf8("\xF0\x9F\xA6"));   // truncated 🦙
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));       // overlong '/'
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));   // surrogate U+D800
  EXPECT_FALSE(IsValidUtf8("\xBD"));           // lone continuation byte
}

class Llama2TextStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokenizer_ = LoadOrDie(Llama2TokenizerPath());
    ASSERT_NE(tokenizer_, nullptr);
  }

  // Streams `text` after a BOS context and checks the result.
  void ExpectStreamsBack(const std::string& text) {
    const std::vector<int> ids = tokenizer_->Encode(text, /*add_bos=*/false);
    EXPECT_EQ(StreamAll(*tokenizer_, {tokenizer_->bos_id()}, ids), text);
    EXPECT_EQ(StreamAll(*tokenizer_, {}, ids), text);
  }

  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(Llama2TextStreamTest, Emoji) { ExpectStreamsBack("I like 🦙 and 🐝"); }

TEST_F(Llama2TextStreamTest, Chinese) {
  ExpectStreamsBack("你好，世界。今天天气很好");
}

TEST_F(Llama2TextStreamTest, MixedScripts) {
  ExpectStreamsBack("Grüße 🐝🐝 — naïve café, ελληνικά, 日本語 and  two spaces");
}

TEST_F(Llama2TextStreamTest, HoldsBackPartialCharacter) {
  // 🦙 is U+1F999, F0 9F A6 99 in UTF-8, and each byte is its own id.
  const std::vector<int> ids = tokenizer_->Encode("I like 🦙", false);
  ASSERT_EQ(ids.size(), 7u);

  TextStream stream(*tokenizer_, {tokenizer_->bos_id()});
  EXPECT_EQ(stream.Push(ids[0]), "I");
  EXPECT_EQ(stream.Push(ids[1]), " like");
  EXPECT_EQ(stream.Push(ids[2]), " ");
  EXPECT_EQ(stream.Push(ids[3]), "");
  EXPECT_EQ(stream.Push(ids[4]), "");
  EXPECT_EQ(stream.Push(ids[5]), "");
  EXPECT_EQ(stream.Push(ids[6]), "🦙");
  EXPECT_EQ(stream.Flush(), "");
  EXPECT_EQ(stream.text(), "I like 🦙");
}

TEST_F(Llama2TextStreamTest, FlushReplacesIncompleteBytes) {
  TextStream stream(*tokenizer_, {tokenizer_->bos_id()});
  EXPECT_EQ(stream.Push(3 + 0xF0), "");
  EXPECT_EQ(stream.Push(3 + 0x9F), "");

  const std::string rest = stream.Flush();
  EXPECT_EQ(rest, std::string(kReplacementCharacter) + kReplacementCharacter);
  EXPECT_EQ(rest, tokenizer_->Decode({3 + 0xF0, 3 + 0x9F}));
}

TEST_F(Llama2TextStreamTest, InvalidBytesAreReplaced) {
  // A lead byte followed by a plain piece can never complete.
  TextStream stream(*tokenizer_, {tokenizer_->bos_id()});
  EXPECT_EQ(stream.Push(3 + 0xE4), "");
  EXPECT_EQ(stream.Push(15043), std::string(kReplacementCharacter) + " Hello");
}

TEST_F(Llama2TextStreamTest, ContextEndingInsideCharacter) {
  const std::vector<int> ids = tokenizer_->Encode("I like 🦙", true);
  ASSERT_EQ(ids.size(), 8u);
  const std::vector<int> context(ids.begin(), ids.end() - 2);

  TextStream stream(*tokenizer_, context);
  EXPECT_EQ(stream.Push(ids[6]), "");
  EXPECT_EQ(stream.Push(ids[7]), "🦙");
}

TEST_F(Llama2TextStreamTest, IgnoresOutOfRangeIds) {
  TextStream stream(*tokenizer_, {tokenizer_->bos_id(), -7, 15043});
  EXPECT_EQ(stream.Push(-1), "");
  EXPECT_EQ(stream.Push(32000), "");
  EXPECT_EQ(stream.Push(3186), " world");
  EXPECT_EQ(stream.text(), " world");
}

class StoriesTextStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokenizer_ = LoadOrDie(Stories260kDir() + "/tokenizer.model");
    ASSERT_NE(tokenizer_, nullptr);
  }

  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(StoriesTextStreamTest, KeepsSpaceAfterPrompt) {
  // The first two reference ids are "," and "▁there".
  ASSERT_GE(kStoriesReferenceIds.size(), 2u);
  TextStream stream(*tokenizer_, kStoriesPromptIds);
  EXPECT_EQ(stream.Push(kStoriesReferenceIds[0]), ",");
  EXPECT_EQ(stream.Push(kStoriesReferenceIds[1]), " there");
  EXPECT_EQ(stream.text(), ", there");
}

TEST_F(StoriesTextStreamTest, FirstPieceWithoutPrompt) {
  // With only BOS as context, SentencePiece drops the space of "▁Once".
  TextStream stream(*tokenizer_, {tokenizer_->bos_id()});
  EXPECT_EQ(stream.Push(403), "Once");
  EXPECT_EQ(stream.Push(407), " upon");
}

TEST_F(StoriesTextStreamTest, ReferenceStory) {
  EXPECT_EQ(StreamAll(*tokenizer_, kStoriesPromptIds, kStoriesReferenceIds),
            ", there was a little girl named Lily. She loved to play outside "
            "in the park. One day, she saw a big, red ball. She wanted to "
            "play with it,");
}

TEST_F(StoriesTextStreamTest, ControlIdsMidStream) {
  // stories260k ends a story with BOS and may start the next one right away.
  // A decode of the whole sequence keeps the space of "▁Once" after it.
  TextStream stream(*tokenizer_, kStoriesPromptIds);
  EXPECT_EQ(stream.Push(kStoriesReferenceIds[0]), ",");
  EXPECT_EQ(stream.Push(tokenizer_->bos_id()), "");
  EXPECT_EQ(stream.Push(tokenizer_->eos_id()), "");
  EXPECT_EQ(stream.Push(403), " Once");
  EXPECT_EQ(stream.text(), ", Once");
}

// Random ids, weighted towards byte-fallback and control pieces, must stream
// to exactly what a decode of the whole sequence adds to the context.
void ExpectRandomStreamsMatchDecode(const Tokenizer& tokenizer,
                                    uint32_t seed) {
  std::mt19937 random(seed);
  std::uniform_int_distribution<int> any_id(0, tokenizer.vocab_size() - 1);
  std::uniform_int_distribution<int> any_byte(0, 255);
  std::uniform_int_distribution<int> continuation_byte(0x80, 0xBF);
  std::uniform_int_distribution<int> control_id(0, 2);
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<int> context_size(0, 6);

  const int first_byte_id = 3;  // <0x00> in both test tokenizers
  auto random_id = [&]() {
    const int k = kind(random);
    if (k < 3) return first_byte_id + any_byte(random);
    if (k < 6) return first_byte_id + continuation_byte(random);
    if (k < 7) return control_id(random);
    return any_id(random);
  };

  for (int trial = 0; trial < 200; ++trial) {
    // A context from ordinary text ends on a character boundary.
    std::vector<int> context = tokenizer.Encode("Once upon", true);
    context.resize(context_size(random) % (context.size() + 1));
    std::vector<int> generated(40);
    for (int& id : generated) id = random_id();

    std::vector<int> all = context;
    all.insert(all.end(), generated.begin(), generated.end());
    const std::string context_text = tokenizer.Decode(context);
    const std::string full_text = tokenizer.Decode(all);
    ASSERT_EQ(full_text.compare(0, context_text.size(), context_text), 0);

    SCOPED_TRACE(::testing::Message() << "seed " << seed << " trial " << trial);
    EXPECT_EQ(StreamAll(tokenizer, context, generated),
              full_text.substr(context_text.size()));
  }
}

TEST_F(StoriesTextStreamTest, RandomIdsMatchDecode) {
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    ExpectRandomStreamsMatchDecode(*tokenizer_, seed);
  }
}

TEST_F(Llama2TextStreamTest, RandomIdsMatchDecode) {
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    ExpectRandomStreamsMatchDecode(*tokenizer_, seed);
  }
}

}  // namespace
}  // namespace pollen::client
