// A SentencePiece BPE tokenizer.model for generated benchmark checkpoints.
//
// Random checkpoints need a tokenizer that Pollen's reader accepts and that
// encodes English text into a realistic number of tokens. The pieces are
// built from a fixed alphabet, not trained on a corpus, and the file is
// written in the protobuf wire format of sentencepiece_model.proto without
// libsentencepiece (see client/sentencepiece_model.h for why).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "client/sentencepiece_model.h"

namespace pollen::bench {

// Builds a BPE model with `vocab_size` pieces, laid out like Llama 2's
// tokenizer: <unk> (id 0, unknown), <s> (1, control), </s> (2, control),
// the 256 byte-fallback pieces <0x00>..<0xFF> (ids 3..258), merged pieces
// with falling scores, and finally the single characters. The characters
// are U+2581 (the space marker), ASCII letters, digits and common
// punctuation. The merges join U+2581 with a character, and ASCII letters
// into pairs and triples with or without a leading U+2581. Every merged
// piece is thus the concatenation of two shorter pieces, which BPE needs to
// reach it. Other characters use byte fallback. Normalization is identity
// with a dummy prefix, as in Llama 2.
//
// Returns INVALID_ARGUMENT when `vocab_size` is below the special, byte and
// character pieces or above what the merges can fill; the message gives the
// valid range.
absl::StatusOr<client::SentencePieceModel> MakeSyntheticBpeModel(
    int vocab_size);

// Serializes `model` as a sentencepiece.ModelProto: every piece, and the
// trainer and normalizer fields that SentencePieceModel contains (a
// denormalizer is never written). ParseSentencePieceModel reads it back
// unchanged.
std::string SerializeSentencePieceModel(const client::SentencePieceModel& model);

}  // namespace pollen::bench
