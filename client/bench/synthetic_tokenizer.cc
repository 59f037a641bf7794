#include "client/bench/synthetic_tokenizer.h"

#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pollen::bench {
namespace {

using client::PieceType;
using client::SentencePieceModel;

// U+2581 LOWER ONE EIGHTH BLOCK, SentencePiece's marker for a space.
constexpr char kSpaceSymbol[] = "\xE2\x96\x81";

constexpr char kLowercase[] = "abcdefghijklmnopqrstuvwxyz";
constexpr char kUppercase[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
constexpr char kDigitsAndPunctuation[] = "0123456789.,!?'\"-:;()";

// <unk>, <s> and </s>, then one piece per byte.
constexpr int kSpecialPieces = 3 + 256;

// Protobuf wire types.
constexpr int kVarint = 0;
constexpr int kLengthDelimited = 2;
constexpr int kFixed32 = 5;

// Field numbers of sentencepiece_model.proto.
constexpr int kModelPieces = 1;
constexpr int kModelTrainerSpec = 2;
constexpr int kModelNormalizerSpec = 3;
constexpr int kPieceText = 1;
constexpr int kPieceScore = 2;
constexpr int kPieceType = 3;
constexpr int kTrainerModelType = 3;
constexpr int kTrainerVocabSize = 4;
constexpr int kTrainerTreatWhitespaceAsSuffix = 24;
constexpr int kTrainerByteFallback = 35;
constexpr int kTrainerUnkSurface = 44;
constexpr int kTrainerUnkPiece = 45;
constexpr int kTrainerBosPiece = 46;
constexpr int kTrainerEosPiece = 47;
constexpr int kNormalizerName = 1;
constexpr int kNormalizerPrecompiledCharsmap = 2;
constexpr int kNormalizerAddDummyPrefix = 3;
constexpr int kNormalizerRemoveExtraWhitespaces = 4;
constexpr int kNormalizerEscapeWhitespaces = 5;

void AppendVarint(uint64_t value, std::string& out) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

void AppendKey(int field, int wire_type, std::string& out) {
  AppendVarint(static_cast<uint64_t>(field) << 3 | wire_type, out);
}

void AppendVarintField(int field, uint64_t value, std::string& out) {
  AppendKey(field, kVarint, out);
  AppendVarint(value, out);
}

void AppendBytesField(int field, const std::string& bytes, std::string& out) {
  AppendKey(field, kLengthDelimited, out);
  AppendVarint(bytes.size(), out);
  out.append(bytes);
}

void AppendFloatField(int field, float value, std::string& out) {
  AppendKey(field, kFixed32, out);
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(bits >> (8 * i)));
}

// Characters of the alphabet, the space marker first.
std::vector<std::string> Characters() {
  std::vector<std::string> characters = {kSpaceSymbol};
  for (const char* group : {kLowercase, kUppercase, kDigitsAndPunctuation}) {
    for (const char* c = group; *c != '\0'; ++c) characters.emplace_back(1, *c);
  }
  return characters;
}

// Merged pieces in falling priority. Each one is the concatenation of two
// pieces listed before it or among the characters.
std::vector<std::string> Merges() {
  const std::string space = kSpaceSymbol;
  std::vector<std::string> lower_pairs;
  std::vector<std::string> capitalized_pairs;
  for (const char* first : {kLowercase, kUppercase}) {
    for (const char* a = first; *a != '\0'; ++a) {
      for (const char* b = kLowercase; *b != '\0'; ++b) {
        (first == kLowercase ? lower_pairs : capitalized_pairs)
            .push_back(std::string{*a, *b});
      }
    }
  }
  std::vector<std::string> lower_triples;
  for (const std::string& pair : lower_pairs) {
    for (const char* c = kLowercase; *c != '\0'; ++c) {
      lower_triples.push_back(pair + *c);
    }
  }

  std::vector<std::string> merges;
  const std::vector<std::string> characters = Characters();
  for (size_t i = 1; i < characters.size(); ++i) {
    merges.push_back(space + characters[i]);
  }
  for (const auto* group : {&lower_pairs, &capitalized_pairs}) {
    merges.insert(merges.end(), group->begin(), group->end());
  }
  for (const auto* group : {&lower_pairs, &capitalized_pairs}) {
    for (const std::string& pair : *group) merges.push_back(space + pair);
  }
  merges.insert(merges.end(), lower_triples.begin(), lower_triples.end());
  for (const std::string& triple : lower_triples) {
    merges.push_back(space + triple);
  }
  return merges;
}

}  // namespace

absl::StatusOr<SentencePieceModel> MakeSyntheticBpeModel(int vocab_size) {
  const std::vector<std::string> characters = Characters();
  const std::vector<std::string> merges = Merges();
  const int min_size = kSpecialPieces + static_cast<int>(characters.size());
  const int max_size = min_size + static_cast<int>(merges.size());
  if (vocab_size < min_size || vocab_size > max_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a synthetic tokenizer of ", vocab_size, " pieces cannot be built; ",
        "the vocabulary size must be in ", min_size, "..", max_size));
  }

  SentencePieceModel model;
  model.model_type = client::SentencePieceModelType::kBpe;
  model.byte_fallback = true;
  model.normalizer_name = "identity";
  model.add_dummy_prefix = true;
  model.remove_extra_whitespaces = false;
  model.escape_whitespaces = true;

  // Special and byte pieces score 0, as in Llama 2's tokenizer.
  model.pieces.push_back({"<unk>", 0, PieceType::kUnknown});
  model.pieces.push_back({"<s>", 0, PieceType::kControl});
  model.pieces.push_back({"</s>", 0, PieceType::kControl});
  for (int byte = 0; byte < 256; ++byte) {
    model.pieces.push_back(
        {absl::StrFormat("<0x%02X>", byte), 0, PieceType::kByte});
  }

  // BPE applies the highest-scoring merge first.
  const int num_merges = vocab_size - min_size;
  float score = 0;
  for (int i = 0; i < num_merges; ++i) {
    model.pieces.push_back({merges[i], score, PieceType::kNormal});
    score -= 1;
  }
  for (const std::string& character : characters) {
    model.pieces.push_back({character, score, PieceType::kNormal});
    score -= 1;
  }
  return model;
}

std::string SerializeSentencePieceModel(const SentencePieceModel& model) {
  std::string out;
  for (const SentencePieceModel::Piece& piece : model.pieces) {
    std::string message;
    AppendBytesField(kPieceText, piece.text, message);
    AppendFloatField(kPieceScore, piece.score, message);
    AppendVarintField(kPieceType, static_cast<uint64_t>(piece.type), message);
    AppendBytesField(kModelPieces, message, out);
  }

  std::string trainer;
  AppendVarintField(kTrainerModelType, static_cast<uint64_t>(model.model_type),
                    trainer);
  AppendVarintField(kTrainerVocabSize, model.pieces.size(), trainer);
  AppendVarintField(kTrainerTreatWhitespaceAsSuffix,
                    model.treat_whitespace_as_suffix, trainer);
  AppendVarintField(kTrainerByteFallback, model.byte_fallback, trainer);
  AppendBytesField(kTrainerUnkSurface, model.unk_surface, trainer);
  AppendBytesField(kTrainerUnkPiece, model.unk_piece, trainer);
  AppendBytesField(kTrainerBosPiece, model.bos_piece, trainer);
  AppendBytesField(kTrainerEosPiece, model.eos_piece, trainer);
  AppendBytesField(kModelTrainerSpec, trainer, out);

  std::string normalizer;
  AppendBytesField(kNormalizerName, model.normalizer_name, normalizer);
  if (!model.precompiled_charsmap.empty()) {
    AppendBytesField(kNormalizerPrecompiledCharsmap, model.precompiled_charsmap,
                     normalizer);
  }
  AppendVarintField(kNormalizerAddDummyPrefix, model.add_dummy_prefix,
                    normalizer);
  AppendVarintField(kNormalizerRemoveExtraWhitespaces,
                    model.remove_extra_whitespaces, normalizer);
  AppendVarintField(kNormalizerEscapeWhitespaces, model.escape_whitespaces,
                    normalizer);
  AppendBytesField(kModelNormalizerSpec, normalizer, out);
  return out;
}

}  // namespace pollen::bench
