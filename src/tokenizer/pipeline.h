// Internal: a configurable tokenization pipeline in the shape of HF `tokenizers`
// (added tokens -> normalizer -> pre-tokenizer -> model -> post-processor; decoder chain).
// Both tokenizer.json and GGUF vocabularies are translated into one of these.
#pragma once
#include <array>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace redknot::tok {

// PCRE2 pattern (UTF + UCP), compiled once, usable from several threads.
class Regex {
 public:
  explicit Regex(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Non-overlapping matches as [begin, end) byte ranges, left to right.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view text) const;

 private:
  void* code_ = nullptr;  // pcre2_code_8*
};

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

struct NormalizerStep {
  enum Kind { kNfc, kNfd, kNfkc, kNfkd, kLowercase, kPrepend, kReplace, kStrip } kind;
  std::string text, content;     // Prepend: text; Replace: pattern text -> content
  std::shared_ptr<Regex> regex;  // Replace with a regex pattern
  bool left = false, right = false;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
enum class PrependScheme { kFirst, kAlways, kNever };

struct PreTokStep {
  enum Kind { kSplit, kByteLevel, kMetaspace, kDigits, kWhitespaceSplit } kind;
  std::shared_ptr<Regex> regex;  // Split (regex) / ByteLevel with use_regex
  std::string literal;           // Split with a String pattern
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
  std::string replacement;  // Metaspace
  PrependScheme scheme = PrependScheme::kAlways;
  bool split = true;
  bool individual_digits = false;
};

struct DecoderStep {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string pattern, content;
  size_t start = 0, stop = 0;
  PrependScheme scheme = PrependScheme::kAlways;
};

enum class ModelKind {
  kBpe,  // HF BPE: merges applied by rank
  kSpm,  // llama.cpp SentencePiece: adjacent pairs merged by highest token score
};

// `<0xNN>` -> NN for a byte-fallback token spelling, else -1.
int byte_token_value(std::string_view token);
// GPT-2's pre-tokenizer pattern (ByteLevel with use_regex).
std::shared_ptr<Regex> gpt2_regex();

class PipelineTokenizer final : public Tokenizer {
 public:
  PipelineTokenizer() = default;

  std::vector<int32_t> encode(std::string_view text, bool add_special = false) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(id_to_token_.size()); }
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  bool is_special(int32_t id) const override;

  // --- configuration (used by the loaders) ---
  // Sets token `id` (grows the vocabulary as needed).
  void set_token(int32_t id, const std::string& token);
  void add_added_token(const AddedToken& t);
  // Merge of tokens a and b (HF BPE); rank = order of addition. Throws on unknown tokens.
  void add_merge(const std::string& a, const std::string& b, const std::string& where);
  void set_scores(std::vector<float> scores) { scores_ = std::move(scores); }
  void finalize();  // builds lookup structures once configuration is complete

  ModelKind model_kind = ModelKind::kBpe;
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  int32_t unk_id = -1;
  std::string continuing_subword_prefix, end_of_word_suffix;
  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokStep> pre_tokenizers;
  std::vector<DecoderStep> decoders;
  bool has_decoder = false;
  // Post-processor template for a single sequence: ids before and after it.
  bool has_template = false;
  std::vector<int32_t> template_prefix, template_suffix;
  void set_bos(int32_t id) { bos_id_ = id; }
  void set_eos(std::vector<int32_t> ids) { eos_ids_ = std::move(ids); }
  void set_add_bos(bool v) { add_bos_ = v; }
  void set_chat_template(std::string t) { chat_template_ = std::move(t); }

 private:
  struct Segment {
    std::string text;
    int32_t added_id = -1;  // >= 0: an added token matched in the text
    bool at_start = false;  // begins at offset 0 of the input (Metaspace prepend "first")
  };
  struct Piece {
    std::string text;
    bool at_start = false;
  };

  void split_added(std::vector<Segment>& segs, bool normalized_pass) const;
  std::string normalize(std::string s) const;
  std::vector<Piece> pre_tokenize(Segment seg) const;
  void model_encode(const std::string& word, std::vector<int32_t>& out) const;
  void bpe_word(const std::string& word, std::vector<int32_t>& out) const;
  void spm_text(const std::string& text, std::vector<int32_t>& out) const;

  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int32_t> token_to_id_;
  std::vector<uint8_t> valid_;    // per id: the id names a token
  std::vector<uint8_t> special_;  // per id
  std::vector<AddedToken> added_;
  std::unordered_map<int32_t, size_t> added_by_id_;
  // Byte trie over added-token contents for leftmost-longest matching, one per pass.
  struct TrieNode {
    std::unordered_map<unsigned char, int32_t> next;
    int32_t token = -1;  // index into added_
  };
  std::vector<TrieNode> trie_raw_, trie_norm_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, new id)
  int32_t merge_count_ = 0;
  std::vector<float> scores_;
  std::array<int32_t, 256> byte_ids_{};  // <0xNN> token ids or -1
  ByteLevelTable byte_table_;

  static constexpr size_t kCacheMaxWordBytes = 256;
  static constexpr size_t kCacheMaxEntries = 200000;
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace redknot::tok
