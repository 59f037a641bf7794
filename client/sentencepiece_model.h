// Reader for SentencePiece model files (tokenizer.model).
//
// A tokenizer.model file is a serialized `sentencepiece.ModelProto`
// (sentencepiece_model.proto in google/sentencepiece). This reader decodes the
// protobuf wire format directly and keeps only the fields that encoding and
// decoding use. Pollen does not link libsentencepiece because Debian 12's
// build (0.1.97) carries its own protobuf 3.14 runtime and exports its
// symbols, which clash with the system protobuf 3.21 that libtorch and gRPC
// load. A process holding both aborts or crashes during static
// initialization, whichever library the dynamic linker finds first.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pollen::client {

// ModelProto.SentencePiece.Type.
enum class PieceType {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

// TrainerSpec.ModelType.
enum class SentencePieceModelType {
  kUnigram = 1,
  kBpe = 2,
  kWord = 3,
  kChar = 4,
};

// The fields of a ModelProto that the tokenizer reads, with the defaults of
// sentencepiece_model.proto for fields the file leaves out.
struct SentencePieceModel {
  struct Piece {
    std::string text;
    float score = 0;
    PieceType type = PieceType::kNormal;
  };

  // ModelProto.pieces, indexed by token id.
  std::vector<Piece> pieces;

  // ModelProto.trainer_spec.
  SentencePieceModelType model_type = SentencePieceModelType::kUnigram;
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  std::string unk_piece = "<unk>";
  std::string bos_piece = "<s>";
  std::string eos_piece = "</s>";
  std::string unk_surface = " \xE2\x81\x87 ";  // " ⁇ " (U+2047)

  // ModelProto.normalizer_spec.
  std::string normalizer_name;
  std::string precompiled_charsmap;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;

  // True when ModelProto.denormalizer_spec has a precompiled character map.
  bool has_denormalizer = false;
};

// Decodes a serialized ModelProto. Returns INVALID_ARGUMENT naming the field
// and byte offset where the data stops being a valid message.
absl::StatusOr<SentencePieceModel> ParseSentencePieceModel(
    absl::string_view serialized);

}  // namespace pollen::client
