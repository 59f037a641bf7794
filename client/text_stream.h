// Incremental detokenization of generated ids.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "client/tokenizer.h"

namespace pollen::client {

// Turns generated ids into text pieces as they arrive.
//
// Decodes the context and generated ids together, so SentencePiece's
// leading-space handling matches a decode of the whole sequence: " there"
// after a prompt keeps its space. Never emits part of a UTF-8 character. The
// byte-fallback ids of one character arrive over several Push calls and are
// held back until the character is complete.
//
// Each Push decodes only a window that starts at the last returned id able
// to start one (see AdvanceWindow), so the cost per id does not grow with the
// length of the sequence. The concatenation of all returned pieces equals
// Decode(context + generated) minus the decoded context, where a context that
// ends inside a character counts that character as generated text.
//
// Not thread-safe. The tokenizer must outlive the stream.
class TextStream {
 public:
  // `context_ids` are the prompt ids, which may start with BOS.
  TextStream(const Tokenizer& tokenizer, std::vector<int> context_ids);

  // Appends one generated id and returns the newly completed text, which is
  // empty while a character is incomplete or when `id` decodes to nothing
  // (BOS, EOS). Ids outside [0, vocab_size()) are ignored.
  std::string Push(int id);

  // Returns the text still held back, with the bytes of an incomplete
  // character decoded as U+FFFD. Call once, after the last Push.
  std::string Flush();

  // All text returned by Push and Flush so far.
  std::string text() const { return text_; }

 private:
  // Number of leading ids of ids_ that end on a character boundary: all of
  // them unless the sequence ends with the byte-fallback ids of an
  // incomplete UTF-8 character.
  size_t CompleteIdCount() const;

  // Returns the text of ids_[window_start_, end) that follows the text
  // already returned, and marks ids_ up to `end` as returned.
  std::string EmitThrough(size_t end);

  // Moves window_start_ close to emitted_end_ (see the definition).
  void AdvanceWindow();

  const Tokenizer& tokenizer_;

  // Context ids followed by every id pushed so far.
  std::vector<int> ids_;

  // ids_[0, emitted_end_) have been turned into text.
  size_t emitted_end_ = 0;

  // Each decode starts at this id instead of at the start of the sequence.
  size_t window_start_ = 0;

  // Size in bytes of Decode(ids_[0, initial emitted_end_)), the context text
  // that is never returned.
  size_t context_text_size_ = 0;

  // Everything returned so far.
  std::string text_;
};

}  // namespace pollen::client
