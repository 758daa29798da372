// UTF-8 helpers shared by the tokenizer pipeline: validation, lossy decoding with the same
// replacement rules as Rust's String::from_utf8_lossy (what HF tokenizers uses), and the GPT-2
// byte <-> unicode table of byte-level BPE.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace redknot::tok {

// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is not valid there.
size_t utf8_valid_len(std::string_view s, size_t i);
// Byte offset of the first invalid sequence, or nullopt when s is valid UTF-8.
std::optional<size_t> utf8_first_invalid(std::string_view s);
// Length of the (assumed valid) UTF-8 character starting with lead byte c.
inline size_t utf8_char_len(unsigned char c) {
  return c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
}
// Each maximal ill-formed subpart becomes one U+FFFD (Unicode / Rust from_utf8_lossy rule).
std::string utf8_lossy(std::string_view bytes);
void append_utf8(std::string& out, uint32_t cp);
// Decodes one valid character at s[i]; advances i.
uint32_t next_codepoint(std::string_view s, size_t& i);

// GPT-2 byte-level alphabet: each byte maps to a printable code point.
class ByteLevelTable {
 public:
  ByteLevelTable();
  const std::string& encode(uint8_t b) const { return byte_to_utf8_[b]; }
  // Byte of a code point of the alphabet, or -1.
  int decode(uint32_t cp) const { return cp < cp_to_byte_.size() ? cp_to_byte_[cp] : -1; }

 private:
  std::array<std::string, 256> byte_to_utf8_;
  std::array<int16_t, 324> cp_to_byte_;
};

}  // namespace redknot::tok
