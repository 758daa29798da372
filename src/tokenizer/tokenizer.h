// Text <-> token ids, bit-exact with Hugging Face `tokenizers` for the BPE styles our model
// families use: byte-level BPE with a regex pre-tokenizer and NFC (Llama-3, Qwen2/3) and
// SentencePiece-style BPE with metaspace and byte fallback (Llama-2, Mistral, GGUF `llama` vocab).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace redknot {

struct GgufVocab;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads an HF tokenizer.json; reads tokenizer_config.json beside it when present (chat
  // template, bos/eos, add_bos_token). Throws Error naming the file on malformed input.
  static std::unique_ptr<Tokenizer> from_hf_file(const std::string& tokenizer_json_path);
  // Builds the tokenizer of a GGUF embedded vocabulary (SentencePiece `llama` model).
  static std::unique_ptr<Tokenizer> from_gguf(const GgufVocab& vocab);

  // Added/special tokens written in the text are matched as such (as HF does). Throws Error on
  // invalid UTF-8. add_special: prepend BOS (and whatever the post-processor adds) when true.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special = false) const = 0;
  // Concatenated text of the ids; bytes that do not form valid UTF-8 become U+FFFD as HF does.
  // Throws Error on an id outside the vocabulary.
  virtual std::string decode(std::span<const int32_t> ids, bool skip_special = false) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::string id_to_token(int32_t id) const = 0;  // raw vocabulary string
  virtual bool is_special(int32_t id) const = 0;

  int32_t bos_id() const { return bos_id_; }
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  bool add_bos() const { return add_bos_; }
  const std::string& chat_template() const { return chat_template_; }

 protected:
  int32_t bos_id_ = -1;
  std::vector<int32_t> eos_ids_;
  bool add_bos_ = false;
  std::string chat_template_;
};

// Incremental detokenizer for streaming: push ids one at a time, get back only text that is
// final — never half a UTF-8 character, and with the same result as decoding all ids at once.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = false);
  // Text that became final with this id (may be empty).
  std::string push(int32_t id);
  // Whatever is left at the end (incomplete bytes become U+FFFD).
  std::string finish();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  // Text is emitted as decode(ids_[prefix_:]) minus decode(ids_[prefix_:read_]): a short window
  // that starts where earlier output was final, so each push costs O(window), not O(all).
  std::string flush(bool final);

  std::vector<int32_t> ids_;
  size_t prefix_ = 0;  // window start
  size_t read_ = 0;    // ids_[prefix_:read_] have been emitted
};

}  // namespace redknot
