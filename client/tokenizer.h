// SentencePiece tokenizer for Llama checkpoints (tokenizer.model).
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "client/sentencepiece_model.h"

namespace pollen::client {

// A SentencePiece BPE tokenizer loaded from a tokenizer.model file.
//
// Encoding and decoding follow SentencePiece 0.1.97 (the Debian 12 release)
// for the models that Llama checkpoints ship: BPE with byte fallback and
// identity normalization. Load rejects models that need anything else
// (unigram models, precompiled normalization rules), see Load. The library
// itself is not linked, for the reason given in sentencepiece_model.h.
//
// Immutable after Load and thread-safe.
class Tokenizer {
 public:
  // Loads the model at `model_path`. Returns NOT_FOUND when the file does not
  // exist, and INVALID_ARGUMENT when it is not a SentencePiece model or uses a
  // feature this tokenizer does not implement: a model type other than BPE,
  // a precompiled normalization or denormalization rule, or
  // treat_whitespace_as_suffix.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(
      const std::string& model_path);

  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Splits `text` into token ids, with bos_id() first when `add_bos` is true
  // and the model defines a BOS piece. Bytes that are not valid UTF-8 are
  // encoded as U+FFFD.
  std::vector<int> Encode(const std::string& text, bool add_bos) const;

  // Joins token ids back into text. Control ids (BOS, EOS) decode to nothing,
  // the leading space of the first piece is dropped, and byte-fallback ids
  // that do not form valid UTF-8 become U+FFFD, one per byte. Ids outside
  // [0, vocab_size()) are skipped.
  std::string Decode(const std::vector<int>& ids) const;

  // The BOS and EOS ids, or -1 when the model defines no such control piece.
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }

  // Number of pieces in the model. Valid ids are [0, vocab_size()).
  int vocab_size() const { return static_cast<int>(model_.pieces.size()); }

  // The raw byte of a byte-fallback piece (`<0xE4>` yields 0xE4), or nullopt
  // for any other piece and for ids outside [0, vocab_size()).
  std::optional<unsigned char> ByteValue(int id) const;

 private:
  explicit Tokenizer(SentencePieceModel model);

  // Builds the lookup tables from model_ and checks the model.
  absl::Status Initialize(const std::string& model_path);

  // Applies the normalizer spec: replaces invalid UTF-8 with U+FFFD, spaces
  // with U+2581 and adds the dummy prefix.
  std::string Normalize(std::string_view text) const;

  // Appends the ids of normalized text, merging characters into pieces by
  // BPE and falling back to byte pieces for unknown characters.
  void EncodeNormalized(std::string_view normalized,
                        std::vector<int>& ids) const;

  // SentencePiece's piece lookup: control, unknown and byte pieces first,
  // then the others, and the unknown id for text that is not a piece.
  int PieceToId(std::string_view piece) const;

  // Returns the normalizer's next unit of non-empty `text`, and how many
  // bytes of `text` it consumes: a user-defined piece, a UTF-8 character, or
  // U+FFFD for one byte that does not start a valid character.
  std::pair<std::string_view, size_t> NextChunk(std::string_view text) const;

  // Length of the longest user-defined piece that `text` starts with, or 0.
  size_t MatchUserDefined(std::string_view text) const;

  SentencePieceModel model_;

  // Views into model_.pieces, which never changes after construction.
  std::unordered_map<std::string_view, int> mergeable_ids_;  // normal, user-defined, unused
  std::unordered_map<std::string_view, int> reserved_ids_;   // control, unknown, byte
  std::unordered_set<std::string_view> user_defined_pieces_;
  size_t max_user_defined_size_ = 0;

  // byte_ids_[b] is the id of piece <0xHH> for byte b, or -1.
  std::array<int, 256> byte_ids_;
  // byte_values_[id] is the byte of a byte piece, or -1.
  std::vector<int> byte_values_;

  int unk_id_ = -1;
  int bos_id_ = -1;
  int eos_id_ = -1;
};

}  // namespace pollen::client
