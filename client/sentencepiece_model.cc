#include "client/sentencepiece_model.h"

#include <cstdint>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_util.h"

namespace pollen::client {
namespace {

// Protobuf wire types.
constexpr int kVarint = 0;
constexpr int kFixed64 = 1;
constexpr int kLengthDelimited = 2;
constexpr int kFixed32 = 5;

// One field of a serialized message, with its value still in wire form.
struct WireField {
  int number = 0;
  int wire_type = 0;
  uint64_t integer = 0;     // kVarint, kFixed64 and kFixed32 values
  absl::string_view bytes;  // kLengthDelimited values
  size_t offset = 0;        // of the field's key, from the start of the file
};

// Reads the fields of one serialized message in order.
class WireReader {
 public:
  // `offset` is where `message` starts in the file, for error messages.
  WireReader(absl::string_view message, size_t offset)
      : message_(message), base_offset_(offset) {}

  bool done() const { return position_ >= message_.size(); }

  absl::Status Next(WireField& field) {
    field = WireField();
    field.offset = base_offset_ + position_;

    uint64_t key;
    POLLEN_RETURN_IF_ERROR(ReadVarint(key));
    field.number = static_cast<int>(key >> 3);
    field.wire_type = static_cast<int>(key & 7);
    if (field.number == 0 || key >> 3 > 0x1FFFFFFF) {
      return Error(field.offset, absl::StrCat("invalid field number ", key >> 3));
    }

    switch (field.wire_type) {
      case kVarint:
        return ReadVarint(field.integer);
      case kFixed64:
        return ReadLittleEndian(8, field.integer);
      case kFixed32:
        return ReadLittleEndian(4, field.integer);
      case kLengthDelimited: {
        uint64_t length;
        POLLEN_RETURN_IF_ERROR(ReadVarint(length));
        if (length > message_.size() - position_) {
          return Error(field.offset,
                       absl::StrCat("field ", field.number, " needs ", length,
                                    " bytes but the message ends after ",
                                    message_.size() - position_));
        }
        field.bytes = message_.substr(position_, length);
        position_ += length;
        return absl::OkStatus();
      }
      default:
        return Error(field.offset,
                     absl::StrCat("field ", field.number,
                                  " has unsupported wire type ",
                                  field.wire_type));
    }
  }

  // Offset in the file of the next unread byte.
  size_t offset() const { return base_offset_ + position_; }

 private:
  absl::Status ReadVarint(uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (done()) return Error(offset(), "varint runs past the end");
      const uint8_t byte = static_cast<uint8_t>(message_[position_++]);
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) return absl::OkStatus();
    }
    return Error(offset(), "varint is longer than 10 bytes");
  }

  absl::Status ReadLittleEndian(int size, uint64_t& value) {
    if (message_.size() - position_ < static_cast<size_t>(size)) {
      return Error(offset(), absl::StrCat(size, "-byte value runs past the end"));
    }
    value = 0;
    for (int i = 0; i < size; ++i) {
      value |= static_cast<uint64_t>(static_cast<uint8_t>(message_[position_ + i]))
               << (8 * i);
    }
    position_ += size;
    return absl::OkStatus();
  }

  static absl::Status Error(size_t offset, absl::string_view problem) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid protobuf data at byte ", offset, ": ", problem));
  }

  absl::string_view message_;
  size_t base_offset_;
  size_t position_ = 0;
};

absl::Status ExpectWireType(const WireField& field, int wire_type,
                            absl::string_view name) {
  if (field.wire_type == wire_type) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("field ", name, " (number ", field.number, ") at byte ",
                   field.offset, " has wire type ", field.wire_type,
                   "; expected ", wire_type));
}

// Calls `handle(field)` for every field of `message`, which starts at byte
// `offset` of the file.
template <typename Handler>
absl::Status ForEachField(absl::string_view message, size_t offset,
                          Handler handle) {
  WireReader reader(message, offset);
  while (!reader.done()) {
    WireField field;
    POLLEN_RETURN_IF_ERROR(reader.Next(field));
    POLLEN_RETURN_IF_ERROR(handle(field));
  }
  return absl::OkStatus();
}

absl::Status ReadBool(const WireField& field, absl::string_view name,
                      bool& value) {
  POLLEN_RETURN_IF_ERROR(ExpectWireType(field, kVarint, name));
  value = field.integer != 0;
  return absl::OkStatus();
}

absl::Status ReadString(const WireField& field, absl::string_view name,
                        std::string& value) {
  POLLEN_RETURN_IF_ERROR(ExpectWireType(field, kLengthDelimited, name));
  value = std::string(field.bytes);
  return absl::OkStatus();
}

// Reads an enum or int32, which protobuf stores as a sign-extended varint.
absl::Status ReadInt32(const WireField& field, absl::string_view name,
                       int64_t& value) {
  POLLEN_RETURN_IF_ERROR(ExpectWireType(field, kVarint, name));
  value = static_cast<int64_t>(field.integer);
  return absl::OkStatus();
}

absl::Status ParsePiece(absl::string_view message, size_t offset,
                        SentencePieceModel::Piece& piece) {
  return ForEachField(message, offset, [&](const WireField& field) {
    switch (field.number) {
      case 1:
        return ReadString(field, "piece", piece.text);
      case 2: {
        POLLEN_RETURN_IF_ERROR(ExpectWireType(field, kFixed32, "score"));
        const uint32_t bits = static_cast<uint32_t>(field.integer);
        std::memcpy(&piece.score, &bits, sizeof(bits));
        return absl::OkStatus();
      }
      case 3: {
        int64_t type;
        POLLEN_RETURN_IF_ERROR(ReadInt32(field, "type", type));
        if (type < 1 || type > 6) {
          return absl::InvalidArgumentError(absl::StrCat(
              "piece type ", type, " at byte ", field.offset,
              " is not one of the SentencePiece types 1 to 6"));
        }
        piece.type = static_cast<PieceType>(type);
        return absl::OkStatus();
      }
      default:
        return absl::OkStatus();
    }
  });
}

absl::Status ParseTrainerSpec(absl::string_view message, size_t offset,
                              SentencePieceModel& model) {
  return ForEachField(message, offset, [&](const WireField& field) {
    switch (field.number) {
      case 3: {
        int64_t type;
        POLLEN_RETURN_IF_ERROR(ReadInt32(field, "model_type", type));
        if (type < 1 || type > 4) {
          return absl::InvalidArgumentError(absl::StrCat(
              "model_type ", type, " is not one of the SentencePiece model "
              "types 1 (UNIGRAM) to 4 (CHAR)"));
        }
        model.model_type = static_cast<SentencePieceModelType>(type);
        return absl::OkStatus();
      }
      case 24:
        return ReadBool(field, "treat_whitespace_as_suffix",
                        model.treat_whitespace_as_suffix);
      case 35:
        return ReadBool(field, "byte_fallback", model.byte_fallback);
      case 44:
        return ReadString(field, "unk_surface", model.unk_surface);
      case 45:
        return ReadString(field, "unk_piece", model.unk_piece);
      case 46:
        return ReadString(field, "bos_piece", model.bos_piece);
      case 47:
        return ReadString(field, "eos_piece", model.eos_piece);
      default:
        return absl::OkStatus();
    }
  });
}

absl::Status ParseNormalizerSpec(absl::string_view message, size_t offset,
                                 SentencePieceModel& model) {
  return ForEachField(message, offset, [&](const WireField& field) {
    switch (field.number) {
      case 1:
        return ReadString(field, "name", model.normalizer_name);
      case 2:
        return ReadString(field, "precompiled_charsmap",
                          model.precompiled_charsmap);
      case 3:
        return ReadBool(field, "add_dummy_prefix", model.add_dummy_prefix);
      case 4:
        return ReadBool(field, "remove_extra_whitespaces",
                        model.remove_extra_whitespaces);
      case 5:
        return ReadBool(field, "escape_whitespaces", model.escape_whitespaces);
      default:
        return absl::OkStatus();
    }
  });
}

absl::Status ParseDenormalizerSpec(absl::string_view message, size_t offset,
                                   SentencePieceModel& model) {
  return ForEachField(message, offset, [&](const WireField& field) {
    if (field.number != 2) return absl::OkStatus();
    std::string charsmap;
    POLLEN_RETURN_IF_ERROR(ReadString(field, "precompiled_charsmap", charsmap));
    model.has_denormalizer = !charsmap.empty();
    return absl::OkStatus();
  });
}

}  // namespace

absl::StatusOr<SentencePieceModel> ParseSentencePieceModel(
    absl::string_view serialized) {
  SentencePieceModel model;
  POLLEN_RETURN_IF_ERROR(
      ForEachField(serialized, 0, [&](const WireField& field) -> absl::Status {
        // Offset in the file of a nested message, once `field` is known to
        // hold one.
        auto nested_offset = [&]() {
          return static_cast<size_t>(field.bytes.data() - serialized.data());
        };
        switch (field.number) {
          case 1: {
            POLLEN_RETURN_IF_ERROR(
                ExpectWireType(field, kLengthDelimited, "pieces"));
            SentencePieceModel::Piece piece;
            POLLEN_RETURN_IF_ERROR(
                ParsePiece(field.bytes, nested_offset(), piece));
            model.pieces.push_back(std::move(piece));
            return absl::OkStatus();
          }
          case 2:
            POLLEN_RETURN_IF_ERROR(
                ExpectWireType(field, kLengthDelimited, "trainer_spec"));
            return ParseTrainerSpec(field.bytes, nested_offset(), model);
          case 3:
            POLLEN_RETURN_IF_ERROR(
                ExpectWireType(field, kLengthDelimited, "normalizer_spec"));
            return ParseNormalizerSpec(field.bytes, nested_offset(), model);
          case 5:
            POLLEN_RETURN_IF_ERROR(
                ExpectWireType(field, kLengthDelimited, "denormalizer_spec"));
            return ParseDenormalizerSpec(field.bytes, nested_offset(), model);
          default:
            return absl::OkStatus();
        }
      }));
  return model;
}

}  // namespace pollen::client
