#include "client/text_stream.h"

#include <optional>
#include <utility>

#include "common/logging.h"

namespace pollen::client {
namespace {

// A UTF-8 character has at most one lead byte and three continuation bytes.
constexpr size_t kMaxContinuationBytes = 3;

bool IsContinuationByte(unsigned char byte) { return (byte & 0xC0) == 0x80; }

// Returns the length in bytes of the UTF-8 sequence that `lead` starts, or 0
// when `lead` cannot start one. Overlong (0xC0, 0xC1) and out-of-range
// (0xF5 to 0xF7) leads count by their bit pattern. Waiting for their
// continuation bytes only delays the U+FFFD that Tokenizer::Decode emits for
// them, and never emits a replacement character that a later byte would
// change.
size_t SequenceLength(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC0 && lead < 0xE0) return 2;
  if (lead >= 0xE0 && lead < 0xF0) return 3;
  if (lead >= 0xF0 && lead < 0xF8) return 4;
  return 0;
}

}  // namespace

TextStream::TextStream(const Tokenizer& tokenizer,
                       std::vector<int> context_ids)
    : tokenizer_(tokenizer) {
  ids_.reserve(context_ids.size());
  for (const int id : context_ids) {
    if (id >= 0 && id < tokenizer_.vocab_size()) ids_.push_back(id);
  }

  // A context that ends inside a character leaves that character to the
  // generated text, where it is completed.
  emitted_end_ = CompleteIdCount();
  const std::vector<int> context(ids_.begin(), ids_.begin() + emitted_end_);
  context_text_size_ = tokenizer_.Decode(context).size();
  AdvanceWindow();
}

std::string TextStream::Push(int id) {
  if (id < 0 || id >= tokenizer_.vocab_size()) {
    POLLEN_LOG_DEBUG("TextStream ignores id {} outside the vocabulary of {}",
                     id, tokenizer_.vocab_size());
    return "";
  }
  ids_.push_back(id);
  return EmitThrough(CompleteIdCount());
}

std::string TextStream::Flush() { return EmitThrough(ids_.size()); }

size_t TextStream::CompleteIdCount() const {
  // Walk back over the trailing byte-fallback ids to the lead byte of the
  // last character.
  size_t continuation_bytes = 0;
  for (size_t i = ids_.size(); i > 0; --i) {
    const std::optional<unsigned char> byte = tokenizer_.ByteValue(ids_[i - 1]);

    // A normal piece or control id ends the byte run, and Tokenizer::Decode
    // decodes the run without looking past it.
    if (!byte.has_value()) return ids_.size();

    if (IsContinuationByte(*byte)) {
      ++continuation_bytes;
      // Too many continuation bytes for one character: they are invalid
      // bytes that decode to U+FFFD whatever follows.
      if (continuation_bytes > kMaxContinuationBytes) return ids_.size();
      continue;
    }

    const size_t length = SequenceLength(*byte);
    if (length > continuation_bytes + 1) return i - 1;
    return ids_.size();
  }
  return ids_.size();
}

std::string TextStream::EmitThrough(size_t end) {
  if (end <= emitted_end_) return "";

  // Decode the window with and without the new ids. Both decodes start at the
  // same id, so SentencePiece's leading-space removal affects them equally
  // and the difference is the new text.
  const auto window_begin = ids_.begin() + window_start_;
  const std::string before = tokenizer_.Decode(
      std::vector<int>(window_begin, ids_.begin() + emitted_end_));
  const std::string after =
      tokenizer_.Decode(std::vector<int>(window_begin, ids_.begin() + end));

  std::string piece;
  if (after.compare(0, before.size(), before) == 0) {
    piece = after.substr(before.size());
  } else {
    // Not expected, because Tokenizer::Decode works left to right, but a
    // decode from the first id is correct whatever the window holds.
    POLLEN_LOG_DEBUG("TextStream window decode is not a prefix; decoding {} ids",
                     end);
    const std::string full =
        tokenizer_.Decode(std::vector<int>(ids_.begin(), ids_.begin() + end));
    const size_t returned_size = context_text_size_ + text_.size();
    if (full.size() > returned_size) piece = full.substr(returned_size);
  }

  emitted_end_ = end;
  text_ += piece;
  AdvanceWindow();
  return piece;
}

// The window may start at any id that (1) decodes to text on its own, and
// (2) is not a UTF-8 continuation byte. By (1), SentencePiece's rule of
// dropping the leading space of the first piece can only touch that id,
// because a decode stops dropping once it has produced text. By (2), the
// window starts on a character boundary. That id has already been returned
// as text, so neither effect reaches new text. The last such id before
// emitted_end_ keeps the window short.
void TextStream::AdvanceWindow() {
  for (size_t i = emitted_end_; i > window_start_; --i) {
    const int id = ids_[i - 1];

    const std::optional<unsigned char> byte = tokenizer_.ByteValue(id);
    if (byte.has_value() && IsContinuationByte(*byte)) continue;
    if (tokenizer_.Decode({id}).empty()) continue;

    window_start_ = i - 1;
    return;
  }
}

}  // namespace pollen::client
