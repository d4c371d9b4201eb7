// Tokenizers built from GGUF metadata (tokenizer.ggml.*):
//  - byte-level BPE ("gpt2": SmolLM2, Llama 3, Qwen2): the GPT-2 pre-tokenizer pattern, merges by
//    rank;
//  - SentencePiece-style BPE ("llama": Llama 2, Mistral): spaces as U+2581, a leading space, merges
//    of the highest-scoring pair first, <0xXX> byte fallback;
// special tokens matched in the text first, incremental UTF-8-safe decoding for streaming, and the
// basics of the ChatML chat template.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/gguf.h"

namespace kvq::worker {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"
  std::string content;
};

class Tokenizer {
 public:
  // From the GGUF metadata; Unimplemented for tokenizer models other than "gpt2".
  static absl::StatusOr<Tokenizer> FromGguf(const GgufFile& file);
  // From explicit parts (tests). token_types: 1 normal, 3 control, 4 user-defined (special).
  static absl::StatusOr<Tokenizer> FromParts(std::vector<std::string> tokens, std::vector<int> token_types,
                                             const std::vector<std::string>& merges, bool digits_individually);
  // SentencePiece-style vocabulary: tokens with scores; token_types 6 = byte (<0xXX>).
  static absl::StatusOr<Tokenizer> FromSpmParts(std::vector<std::string> tokens, std::vector<float> scores,
                                                std::vector<int> token_types, bool add_space_prefix);

  std::vector<int32_t> Encode(const std::string& text, bool parse_special = true) const;
  // Text of the ids; special tokens are written as their text unless skip_special.
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const;
  // Raw bytes of one token (special tokens: their text).
  std::string TokenBytes(int32_t id) const;
  bool IsSpecial(int32_t id) const;
  int32_t vocab_size() const { return int32_t(tokens_.size()); }
  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  // Ids that end generation (eos and, for ChatML, <|im_end|>).
  const std::vector<int32_t>& stop_ids() const { return stop_ids_; }
  // -1 when the text is not a token.
  int32_t TokenId(const std::string& token_text) const;

  // ChatML prompt for the messages, ending with the assistant header. Adds the template's
  // default system message when the first message is not a system message.
  std::string ApplyChatTemplate(const std::vector<ChatMessage>& messages) const;
  bool has_chat_template() const { return chatml_; }
  // The pre-tokenizer's words (the GPT-2 pattern, digits split first where the model does).
  std::vector<std::string> PreTokenize(const std::string& text) const {
    std::vector<std::string> words;
    SplitWords(text, &words);
    return words;
  }

 private:
  void SplitWords(const std::string& text, std::vector<std::string>* words) const;
  void Bpe(const std::string& word, std::vector<int32_t>* out) const;
  void Spm(const std::string& text, std::vector<int32_t>* out) const;

  std::vector<std::string> tokens_;            // as stored (byte-mapped unicode)
  std::vector<std::string> token_bytes_;       // decoded raw bytes
  std::vector<uint8_t> special_;
  bool spm_ = false;                           // SentencePiece-style vocabulary
  bool add_space_prefix_ = false;
  std::vector<float> scores_;
  int32_t byte_tokens_[256] = {};              // SPM byte fallback ids (-1 when absent)
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<std::string, int32_t> merge_rank_;
  std::vector<std::pair<std::string, int32_t>> specials_;  // longest first
  bool digits_individually_ = false;
  int32_t bos_ = -1, eos_ = -1;
  std::vector<int32_t> stop_ids_;
  bool chatml_ = false;
  std::string default_system_;
};

// Turns a stream of token byte strings into valid UTF-8 pieces: bytes of a character split
// across tokens are held back until the character is complete; invalid bytes become U+FFFD.
class Utf8Stream {
 public:
  std::string Push(const std::string& bytes);
  std::string Flush();  // whatever is left (an incomplete tail becomes U+FFFD)

 private:
  std::string pending_;
};

}  // namespace kvq::worker
