#include "client/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <queue>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_util.h"

namespace pollen::client {
namespace {

// U+2581 LOWER ONE EIGHTH BLOCK, SentencePiece's marker for a space.
constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";

// U+FFFD REPLACEMENT CHARACTER.
constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";

bool IsContinuationByte(unsigned char byte) { return (byte & 0xC0) == 0x80; }

// Returns the length of the well-formed UTF-8 character at the start of
// `text`, or 0 when it starts with an invalid or truncated sequence. Overlong
// forms, surrogates and code points above U+10FFFF are invalid, as in
// SentencePiece's decoder.
size_t ValidCharLength(std::string_view text) {
  if (text.empty()) return 0;
  const unsigned char lead = static_cast<unsigned char>(text[0]);
  if (lead < 0x80) return 1;

  size_t length;
  uint32_t code_point;
  uint32_t min_code_point;
  if ((lead & 0xE0) == 0xC0) {
    length = 2;
    code_point = lead & 0x1F;
    min_code_point = 0x80;
  } else if ((lead & 0xF0) == 0xE0) {
    length = 3;
    code_point = lead & 0x0F;
    min_code_point = 0x800;
  } else if ((lead & 0xF8) == 0xF0) {
    length = 4;
    code_point = lead & 0x07;
    min_code_point = 0x10000;
  } else {
    return 0;
  }
  if (text.size() < length) return 0;

  for (size_t i = 1; i < length; ++i) {
    const unsigned char byte = static_cast<unsigned char>(text[i]);
    if (!IsContinuationByte(byte)) return 0;
    code_point = (code_point << 6) | (byte & 0x3F);
  }
  if (code_point < min_code_point) return 0;
  if (code_point >= 0xD800 && code_point < 0xE000) return 0;
  if (code_point > 0x10FFFF) return 0;
  return length;
}

// Length of the character that `text` starts with, judged by the lead byte
// alone as SentencePiece splits normalized text. At least 1 for non-empty
// text and never more than its size.
size_t CharLength(std::string_view text) {
  const unsigned char lead = static_cast<unsigned char>(text[0]);
  size_t length = 1;
  if (lead >= 0xF0) {
    length = 4;
  } else if (lead >= 0xE0) {
    length = 3;
  } else if (lead >= 0xC0) {
    length = 2;
  }
  return std::min(length, text.size());
}

// Appends the bytes of a run of byte-fallback pieces, turning each byte that
// does not start a valid character into U+FFFD.
void AppendBytesAsUtf8(std::string_view bytes, std::string& text) {
  size_t offset = 0;
  while (offset < bytes.size()) {
    const size_t length = ValidCharLength(bytes.substr(offset));
    if (length == 0) {
      text.append(kReplacementCharacter);
      ++offset;
    } else {
      text.append(bytes.substr(offset, length));
      offset += length;
    }
  }
}

// Appends `piece` with every U+2581 replaced by a space.
void AppendWithSpaces(std::string_view piece, std::string& text) {
  size_t start = 0;
  while (true) {
    const size_t found = piece.find(kSpaceSymbol, start);
    if (found == std::string_view::npos) break;
    text.append(piece.substr(start, found - start));
    text.push_back(' ');
    start = found + kSpaceSymbol.size();
  }
  text.append(piece.substr(start));
}

// Parses a byte-fallback piece spelled "<0xHH>", or returns -1.
int ParseBytePiece(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') {
    return -1;
  }
  int value = 0;
  for (const char c : piece.substr(3, 2)) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

const char* ModelTypeName(SentencePieceModelType type) {
  switch (type) {
    case SentencePieceModelType::kUnigram:
      return "UNIGRAM";
    case SentencePieceModelType::kBpe:
      return "BPE";
    case SentencePieceModelType::kWord:
      return "WORD";
    case SentencePieceModelType::kChar:
      return "CHAR";
  }
  return "unknown";
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::exists(path, error)) {
    return absl::NotFoundError(
        absl::StrCat("tokenizer model not found: ", path));
  }
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer model ", path,
                     " is not a regular file; pass the path of tokenizer.model"));
  }

  std::ifstream file(path, std::ios::binary);
  std::ostringstream contents;
  contents << file.rdbuf();
  if (!file.good() || !contents.good()) {
    return absl::InvalidArgumentError(
        absl::StrCat("failed to read tokenizer model ", path));
  }
  return contents.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(
    const std::string& model_path) {
  POLLEN_ASSIGN_OR_RETURN(const std::string serialized, ReadFile(model_path));

  absl::StatusOr<SentencePieceModel> model =
      ParseSentencePieceModel(serialized);
  if (!model.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer model ", model_path,
                     " is not a SentencePiece model: ",
                     model.status().message()));
  }

  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer(std::move(*model)));
  POLLEN_RETURN_IF_ERROR(tokenizer->Initialize(model_path));
  POLLEN_LOG_DEBUG("Loaded tokenizer {} with {} pieces", model_path,
                   tokenizer->vocab_size());
  return tokenizer;
}

Tokenizer::Tokenizer(SentencePieceModel model) : model_(std::move(model)) {
  byte_ids_.fill(-1);
}

absl::Status Tokenizer::Initialize(const std::string& model_path) {
  auto invalid = [&](absl::string_view problem) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer model ", model_path, " ", problem));
  };

  // Features beyond what Llama tokenizers use.
  if (model_.model_type != SentencePieceModelType::kBpe) {
    return invalid(absl::StrCat("is a ", ModelTypeName(model_.model_type),
                                " model; only BPE models are supported"));
  }
  if (!model_.precompiled_charsmap.empty()) {
    return invalid(absl::StrCat(
        "uses normalization rule '", model_.normalizer_name,
        "' with a precompiled character map; only identity normalization "
        "is supported"));
  }
  if (model_.has_denormalizer) {
    return invalid("has a denormalization rule, which is not supported");
  }
  if (model_.treat_whitespace_as_suffix) {
    return invalid("sets treat_whitespace_as_suffix, which is not supported");
  }
  if (model_.pieces.empty()) return invalid("has no pieces");

  // Index the pieces as SentencePiece does: pieces that BPE may produce in
  // one table, control, unknown and byte pieces in the other.
  byte_values_.assign(model_.pieces.size(), -1);
  for (size_t i = 0; i < model_.pieces.size(); ++i) {
    const int id = static_cast<int>(i);
    const SentencePieceModel::Piece& piece = model_.pieces[i];
    const std::string_view text = piece.text;
    if (text.empty()) return invalid(absl::StrCat("has an empty piece, id ", id));
    if (text.find('\0') != std::string_view::npos) {
      return invalid(absl::StrCat("has a piece with a NUL byte, id ", id));
    }

    const bool mergeable = piece.type == PieceType::kNormal ||
                           piece.type == PieceType::kUserDefined ||
                           piece.type == PieceType::kUnused;
    auto& table = mergeable ? mergeable_ids_ : reserved_ids_;
    if (!table.emplace(text, id).second) {
      return invalid(absl::StrCat("defines piece '", piece.text,
                                  "' twice, the second time as id ", id));
    }

    switch (piece.type) {
      case PieceType::kUserDefined:
        user_defined_pieces_.insert(text);
        max_user_defined_size_ = std::max(max_user_defined_size_, text.size());
        break;
      case PieceType::kUnknown:
        if (unk_id_ >= 0) {
          return invalid(absl::StrCat("defines a second unknown piece, id ",
                                      id, "; the first is id ", unk_id_));
        }
        unk_id_ = id;
        break;
      case PieceType::kByte: {
        const int byte = ParseBytePiece(text);
        if (byte < 0) {
          return invalid(absl::StrCat("has byte piece '", piece.text, "' (id ",
                                      id, ") not spelled <0xHH>"));
        }
        byte_ids_[byte] = id;
        byte_values_[i] = byte;
        break;
      }
      default:
        break;
    }
  }

  // SentencePiece's own checks on the special pieces.
  if (unk_id_ < 0) return invalid("defines no unknown piece");
  for (int byte = 0; byte < 256; ++byte) {
    if (model_.byte_fallback && byte_ids_[byte] < 0) {
      return invalid(absl::StrCat("enables byte_fallback but has no piece for "
                                  "byte ", byte));
    }
    if (!model_.byte_fallback && byte_ids_[byte] >= 0) {
      return invalid(absl::StrCat("has byte piece id ", byte_ids_[byte],
                                  " although byte_fallback is off"));
    }
  }

  // BOS and EOS are the control pieces named in the trainer spec.
  auto control_id = [&](const std::string& text) {
    const int id = PieceToId(text);
    return model_.pieces[id].type == PieceType::kControl ? id : -1;
  };
  bos_id_ = control_id(model_.bos_piece);
  eos_id_ = control_id(model_.eos_piece);
  return absl::OkStatus();
}

std::vector<int> Tokenizer::Encode(const std::string& text,
                                   bool add_bos) const {
  std::vector<int> ids;
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
  EncodeNormalized(Normalize(text), ids);
  return ids;
}

std::string Tokenizer::Normalize(std::string_view text) const {
  std::string normalized;
  const std::string_view space =
      model_.escape_whitespaces ? kSpaceSymbol : std::string_view(" ");

  // Drop leading spaces. Text of spaces alone normalizes to nothing.
  if (model_.remove_extra_whitespaces) {
    while (!text.empty()) {
      const auto [chunk, consumed] = NextChunk(text);
      if (chunk != " ") break;
      text.remove_prefix(consumed);
    }
  }
  if (text.empty()) return normalized;

  if (model_.add_dummy_prefix) normalized.append(space);

  // Copy one user-defined piece or character at a time.
  bool previous_ends_in_space = model_.remove_extra_whitespaces;
  while (!text.empty()) {
    auto [chunk, consumed] = NextChunk(text);
    text.remove_prefix(consumed);

    if (previous_ends_in_space) {
      while (!chunk.empty() && chunk[0] == ' ') chunk.remove_prefix(1);
    }
    if (!chunk.empty()) {
      for (const char c : chunk) {
        if (c == ' ') {
          normalized.append(space);
        } else {
          normalized.push_back(c);
        }
      }
      previous_ends_in_space = chunk.back() == ' ';
    }
    if (!model_.remove_extra_whitespaces) previous_ends_in_space = false;
  }

  // Drop trailing spaces.
  if (model_.remove_extra_whitespaces) {
    while (normalized.size() >= space.size() &&
           std::string_view(normalized).substr(normalized.size() -
                                               space.size()) == space) {
      normalized.resize(normalized.size() - space.size());
    }
  }
  return normalized;
}

void Tokenizer::EncodeNormalized(std::string_view normalized,
                                 std::vector<int>& ids) const {
  if (normalized.empty()) return;

  // A symbol covers normalized[begin, begin + size). Merged-away symbols have
  // size 0. prev and next link the live symbols, -1 at the ends.
  struct Symbol {
    size_t begin;
    size_t size;
    int prev;
    int next;
    bool frozen;  // a user-defined piece, never merged
  };
  std::vector<Symbol> symbols;
  while (symbols.empty() ||
         symbols.back().begin + symbols.back().size < normalized.size()) {
    const size_t begin =
        symbols.empty() ? 0 : symbols.back().begin + symbols.back().size;
    const std::string_view rest = normalized.substr(begin);
    const size_t user_defined = MatchUserDefined(rest);
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({begin, user_defined > 0 ? user_defined : CharLength(rest),
                       index - 1, index + 1, user_defined > 0});
  }
  symbols.back().next = -1;

  auto text_of = [&](const Symbol& symbol) {
    return normalized.substr(symbol.begin, symbol.size);
  };

  // Candidate merges of two adjacent symbols into a known piece. The queue
  // yields the highest score first and, on ties, the leftmost pair.
  struct Merge {
    float score;
    int left;
    int right;
    size_t size;
  };
  auto lower_priority = [](const Merge& a, const Merge& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Merge, std::vector<Merge>, decltype(lower_priority)>
      queue(lower_priority);

  // Unused pieces may appear as merge steps but not in the output.
  // `splits` remembers which two pieces formed each one.
  std::unordered_map<std::string_view,
                     std::pair<std::string_view, std::string_view>>
      splits;

  auto add_candidate = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    if (symbols[left].frozen || symbols[right].frozen) return;
    const std::string_view merged = normalized.substr(
        symbols[left].begin, symbols[left].size + symbols[right].size);
    const auto found = mergeable_ids_.find(merged);
    if (found == mergeable_ids_.end()) return;

    const SentencePieceModel::Piece& piece = model_.pieces[found->second];
    queue.push({piece.score, left, right, merged.size()});
    if (piece.type == PieceType::kUnused) {
      splits[merged] = {text_of(symbols[left]), text_of(symbols[right])};
    }
  };

  for (size_t i = 1; i < symbols.size(); ++i) {
    add_candidate(static_cast<int>(i) - 1, static_cast<int>(i));
  }

  // Apply merges until no adjacent pair forms a known piece.
  while (!queue.empty()) {
    const Merge merge = queue.top();
    queue.pop();
    Symbol& left = symbols[merge.left];
    Symbol& right = symbols[merge.right];

    // Skip candidates made stale by an earlier merge of either side.
    if (left.size == 0 || right.size == 0 ||
        left.size + right.size != merge.size) {
      continue;
    }

    left.size += right.size;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = merge.left;
    right.size = 0;

    add_candidate(left.prev, merge.left);
    add_candidate(merge.left, left.next);
  }

  // Emit ids, splitting unused pieces back into their parts and unknown
  // text into bytes. Without byte fallback, a run of unknown symbols becomes
  // one unknown id.
  bool previous_unknown = false;
  std::function<void(std::string_view)> emit = [&](std::string_view text) {
    const int id = PieceToId(text);
    if (model_.pieces[id].type == PieceType::kUnused) {
      const auto split = splits.find(text);
      if (split != splits.end()) {
        emit(split->second.first);
        emit(split->second.second);
        return;
      }
    }

    const bool unknown = id == unk_id_;
    if (unknown && model_.byte_fallback) {
      for (const char c : text) {
        ids.push_back(byte_ids_[static_cast<unsigned char>(c)]);
      }
    } else if (!(unknown && previous_unknown)) {
      ids.push_back(id);
    }
    previous_unknown = unknown;
  };
  for (int i = 0; i >= 0; i = symbols[i].next) emit(text_of(symbols[i]));
}

std::string Tokenizer::Decode(const std::vector<int>& ids) const {
  std::string text;

  // SentencePiece drops the U+2581 that starts the first piece, which the
  // dummy prefix added. `at_start` stays true until a piece adds text or has
  // its leading U+2581 dropped.
  const bool strip_first_space =
      model_.add_dummy_prefix || model_.remove_extra_whitespaces;
  bool at_start = true;
  bool dropped_space = false;

  // Byte-fallback pieces are collected and decoded together, so that the
  // bytes of one character form it.
  std::string bytes;

  for (const int id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    if (byte_values_[id] >= 0) {
      bytes.push_back(static_cast<char>(byte_values_[id]));
      continue;
    }
    AppendBytesAsUtf8(bytes, text);
    bytes.clear();

    if (dropped_space || !text.empty()) at_start = false;
    dropped_space = false;

    const SentencePieceModel::Piece& piece = model_.pieces[id];
    if (piece.type == PieceType::kControl) continue;
    if (id == unk_id_) {
      text.append(model_.unk_surface);
      continue;
    }

    std::string_view piece_text = piece.text;
    if (at_start && strip_first_space &&
        piece_text.substr(0, kSpaceSymbol.size()) == kSpaceSymbol) {
      piece_text.remove_prefix(kSpaceSymbol.size());
      // With remove_extra_whitespaces, `at_start` stays true, so the next
      // piece loses its leading U+2581 too while no text has been added.
      dropped_space = !model_.remove_extra_whitespaces;
    }
    AppendWithSpaces(piece_text, text);
  }
  AppendBytesAsUtf8(bytes, text);
  return text;
}

std::optional<unsigned char> Tokenizer::ByteValue(int id) const {
  if (id < 0 || id >= vocab_size() || byte_values_[id] < 0) return std::nullopt;
  return static_cast<unsigned char>(byte_values_[id]);
}

int Tokenizer::PieceToId(std::string_view piece) const {
  if (const auto found = reserved_ids_.find(piece); found != reserved_ids_.end()) {
    return found->second;
  }
  if (const auto found = mergeable_ids_.find(piece);
      found != mergeable_ids_.end()) {
    return found->second;
  }
  return unk_id_;
}

std::pair<std::string_view, size_t> Tokenizer::NextChunk(
    std::string_view text) const {
  const size_t user_defined = MatchUserDefined(text);
  if (user_defined > 0) return {text.substr(0, user_defined), user_defined};

  const size_t length = ValidCharLength(text);
  if (length == 0) return {kReplacementCharacter, 1};
  return {text.substr(0, length), length};
}

size_t Tokenizer::MatchUserDefined(std::string_view text) const {
  if (user_defined_pieces_.empty()) return 0;
  for (size_t size = std::min(text.size(), max_user_defined_size_); size > 0;
       --size) {
    if (user_defined_pieces_.count(text.substr(0, size)) > 0) return size;
  }
  return 0;
}

}  // namespace pollen::client
