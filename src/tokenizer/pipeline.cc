#include "tokenizer/pipeline.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <queue>

#include "core/error.h"

namespace redknot::tok {
namespace {

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

pcre2_code* as_code(void* p) { return static_cast<pcre2_code*>(p); }

bool is_whitespace_cp(uint32_t cp) {
  if ((cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85) return true;
  if (cp < 0x80) return false;
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP;
}

bool is_word_cp(uint32_t cp) {
  if (cp == '_') return true;
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
         (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

uint32_t last_codepoint(std::string_view s) {
  size_t i = s.size();
  while (i > 0 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i;
  if (i > 0) --i;
  return next_codepoint(s, i);
}

std::string utf8proc_transform(const std::string& s, int options) {
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                              static_cast<utf8proc_ssize_t>(s.size()), &out,
                              static_cast<utf8proc_option_t>(options));
  if (n < 0)
    throw Error(std::string("tokenizer: unicode normalization failed: ") + utf8proc_errmsg(n));
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string::npos) break;
    out.append(s, pos, hit - pos);
    out.append(to);
    pos = hit + from.size();
  }
  if (pos == 0) return;
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

std::vector<std::pair<size_t, size_t>> find_literal(std::string_view text, std::string_view lit) {
  std::vector<std::pair<size_t, size_t>> out;
  if (lit.empty()) return out;
  for (size_t pos = text.find(lit); pos != std::string_view::npos;
       pos = text.find(lit, pos + lit.size())) {
    out.emplace_back(pos, pos + lit.size());
  }
  return out;
}

// HF `NormalizedString::split`: the text cut by `matches` into ranges per the behavior.
std::vector<std::pair<size_t, size_t>> split_ranges(
    size_t len, const std::vector<std::pair<size_t, size_t>>& matches, SplitBehavior behavior,
    bool invert) {
  struct Part {
    size_t b, e;
    bool is_match;
  };
  std::vector<Part> parts;
  size_t pos = 0;
  for (const auto& [b, e] : matches) {
    if (b > pos) parts.push_back({pos, b, invert});
    parts.push_back({b, e, !invert});
    pos = e;
  }
  if (pos < len) parts.push_back({pos, len, invert});

  std::vector<Part> out;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      out = parts;
      break;
    case SplitBehavior::kRemoved:
      for (const auto& p : parts)
        if (!p.is_match) out.push_back(p);
      break;
    case SplitBehavior::kContiguous: {
      bool prev_match = false;
      for (const auto& p : parts) {
        if (p.is_match && prev_match && !out.empty()) {
          out.back().e = p.e;
        } else {
          out.push_back(p);
        }
        prev_match = p.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool prev_match = false;
      for (const auto& p : parts) {
        if (p.is_match && !prev_match && !out.empty()) {
          out.back().e = p.e;
        } else {
          out.push_back(p);
        }
        prev_match = p.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool prev_match = false;
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->is_match && !prev_match && !out.empty()) {
          out.back().b = it->b;
        } else {
          out.push_back(*it);
        }
        prev_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
  std::vector<std::pair<size_t, size_t>> ranges;
  for (const auto& p : out)
    if (p.e > p.b) ranges.emplace_back(p.b, p.e);
  return ranges;
}

// `<0xNN>` byte token -> NN, else -1 (the exact textual check HF's ByteFallback decoder uses).
int parse_byte_token(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
  int v = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char c = t[i];
    int d = -1;
    if (c >= '0' && c <= '9') d = c - '0';
    if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace

int byte_token_value(std::string_view token) { return parse_byte_token(token); }

// ---------------------------------------------------------------------------------------------
Regex::Regex(const std::string& pattern) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    throw Error("tokenizer: bad regex '" + pattern + "' at offset " + std::to_string(err_off) +
                ": " + reinterpret_cast<char*>(msg));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if unavailable
  code_ = code;
}

Regex::~Regex() { pcre2_code_free(as_code(code_)); }

std::vector<std::pair<size_t, size_t>> Regex::find_all(std::string_view text) const {
  std::vector<std::pair<size_t, size_t>> out;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(as_code(code_), nullptr);
  if (md == nullptr) throw Error("tokenizer: out of memory for regex match data");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t off = 0;
  while (off <= text.size()) {
    const int rc =
        pcre2_match(as_code(code_), subject, text.size(), off, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      pcre2_match_data_free(md);
      throw Error("tokenizer: regex match failed (pcre2 error " + std::to_string(rc) + ")");
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t b = ov[0], e = ov[1];
    if (e == b) {  // empty match: step over one character, keep nothing
      if (b >= text.size()) break;
      off = b + utf8_char_len(static_cast<unsigned char>(text[b]));
      continue;
    }
    out.emplace_back(b, e);
    off = e;
  }
  pcre2_match_data_free(md);
  return out;
}

// ---------------------------------------------------------------------------------------------
void PipelineTokenizer::set_token(int32_t id, const std::string& token) {
  // Ids index dense tables; a corrupt file must not make us allocate gigabytes.
  constexpr int32_t kMaxVocab = 1 << 24;
  if (id < 0 || id >= kMaxVocab)
    throw Error("tokenizer: token id " + std::to_string(id) + " of '" + token +
                "' is out of range");
  if (static_cast<size_t>(id) >= id_to_token_.size()) {
    id_to_token_.resize(id + 1);
    valid_.resize(id + 1, 0);
    special_.resize(id + 1, 0);
  }
  id_to_token_[id] = token;
  valid_[id] = 1;
  token_to_id_.emplace(token, id);  // first id wins when a string repeats
}

void PipelineTokenizer::add_added_token(const AddedToken& t) {
  if (t.content.empty()) throw Error("tokenizer: empty added token content");
  if (t.id < 0 || static_cast<size_t>(t.id) >= id_to_token_.size() || !valid_[t.id] ||
      id_to_token_[t.id] != t.content) {
    set_token(t.id, t.content);
  }
  // Added tokens take precedence over the model vocabulary (as HF token_to_id does).
  token_to_id_[t.content] = t.id;
  special_[t.id] = t.special ? 1 : 0;
  added_by_id_[t.id] = added_.size();
  added_.push_back(t);
}

void PipelineTokenizer::add_merge(const std::string& a, const std::string& b,
                                  const std::string& where) {
  const auto ia = token_to_id_.find(a);
  const auto ib = token_to_id_.find(b);
  if (ia == token_to_id_.end() || ib == token_to_id_.end())
    throw Error(where + ": merge '" + a + " " + b + "' uses a token missing from the vocab");
  std::string merged = a;
  if (!continuing_subword_prefix.empty() && b.starts_with(continuing_subword_prefix)) {
    merged += b.substr(continuing_subword_prefix.size());
  } else {
    merged += b;
  }
  const auto im = token_to_id_.find(merged);
  if (im == token_to_id_.end())
    throw Error(where + ": merge '" + a + " " + b + "' gives a token missing from the vocab");
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                       static_cast<uint32_t>(ib->second);
  merges_.emplace(key, std::make_pair(merge_count_++, im->second));
}

void PipelineTokenizer::finalize() {
  byte_ids_.fill(-1);
  for (size_t id = 0; id < id_to_token_.size(); ++id) {
    if (!valid_[id]) continue;
    const int b = parse_byte_token(id_to_token_[id]);
    if (b < 0 || byte_ids_[b] >= 0) continue;
    // Lookups use the canonical upper-case spelling (`<0x0A>`), as HF and llama.cpp do.
    char canonical[16];
    std::snprintf(canonical, sizeof(canonical), "<0x%02X>", static_cast<unsigned>(b) & 0xFF);
    if (id_to_token_[id] == canonical) byte_ids_[b] = static_cast<int32_t>(id);
  }
  trie_raw_.assign(1, TrieNode{});
  trie_norm_.assign(1, TrieNode{});
  for (size_t i = 0; i < added_.size(); ++i) {
    auto& trie = added_[i].normalized ? trie_norm_ : trie_raw_;
    int32_t node = 0;
    for (const unsigned char c : added_[i].content) {
      auto it = trie[node].next.find(c);
      if (it == trie[node].next.end()) {
        trie.push_back(TrieNode{});
        const auto child = static_cast<int32_t>(trie.size() - 1);
        trie[node].next.emplace(c, child);
        node = child;
      } else {
        node = it->second;
      }
    }
    if (trie[node].token < 0) trie[node].token = static_cast<int32_t>(i);
  }
}

std::optional<int32_t> PipelineTokenizer::token_to_id(std::string_view token) const {
  const auto it = token_to_id_.find(std::string(token));
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

std::string PipelineTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !valid_[id])
    throw Error("tokenizer: token id " + std::to_string(id) + " is outside the vocabulary (size " +
                std::to_string(id_to_token_.size()) + ")");
  return id_to_token_[id];
}

bool PipelineTokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < special_.size() && special_[id] != 0;
}

// ---------------------------------------------------------------------------------------------
// Added tokens: leftmost-longest matches, then single_word / lstrip / rstrip as HF applies them.
void PipelineTokenizer::split_added(std::vector<Segment>& segs, bool normalized_pass) const {
  const auto& trie = normalized_pass ? trie_norm_ : trie_raw_;
  if (trie.size() <= 1) return;
  std::vector<Segment> out;
  for (auto& seg : segs) {
    if (seg.added_id >= 0) {
      out.push_back(std::move(seg));
      continue;
    }
    const std::string& s = seg.text;
    size_t emitted = 0;  // end of what has been pushed to `out`
    size_t i = 0;
    while (i < s.size()) {
      int32_t node = 0, best = -1;
      size_t best_end = 0;
      for (size_t k = i; k < s.size(); ++k) {
        const auto it = trie[node].next.find(static_cast<unsigned char>(s[k]));
        if (it == trie[node].next.end()) break;
        node = it->second;
        if (trie[node].token >= 0) {
          best = trie[node].token;
          best_end = k + 1;
        }
      }
      if (best < 0) {
        ++i;
        continue;
      }
      const AddedToken& tok = added_[best];
      size_t start = i, stop = best_end;
      if (tok.single_word) {
        const bool left_ok = start == 0 || !is_word_cp(last_codepoint(s.substr(0, start)));
        size_t j = stop;
        const bool right_ok = stop == s.size() || !is_word_cp(next_codepoint(s, j));
        if (!left_ok || !right_ok) {
          i = best_end;
          continue;
        }
      }
      if (tok.lstrip) {
        while (start > emitted) {
          size_t b = start - 1;
          while (b > emitted && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
          size_t j = b;
          if (!is_whitespace_cp(next_codepoint(s, j))) break;
          start = b;
        }
      }
      if (tok.rstrip) {
        while (stop < s.size()) {
          size_t j = stop;
          if (!is_whitespace_cp(next_codepoint(s, j))) break;
          stop = j;
        }
      }
      if (start > emitted)
        out.push_back({s.substr(emitted, start - emitted), -1, seg.at_start && emitted == 0});
      out.push_back({std::string(), tok.id, false});
      emitted = stop;
      i = stop;
    }
    if (emitted == 0) {
      out.push_back(std::move(seg));
    } else if (emitted < s.size()) {
      out.push_back({s.substr(emitted), -1, false});
    }
  }
  segs = std::move(out);
}

std::string PipelineTokenizer::normalize(std::string s) const {
  for (const auto& n : normalizers) {
    switch (n.kind) {
      case NormalizerStep::kNfc:
        s = utf8proc_transform(s, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        break;
      case NormalizerStep::kNfd:
        s = utf8proc_transform(s, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
        break;
      case NormalizerStep::kNfkc:
        s = utf8proc_transform(s, UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
        break;
      case NormalizerStep::kNfkd:
        s = utf8proc_transform(s, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
        break;
      case NormalizerStep::kLowercase: {
        std::string out;
        for (size_t i = 0; i < s.size();) {
          const uint32_t cp = next_codepoint(s, i);
          append_utf8(out, static_cast<uint32_t>(utf8proc_tolower(static_cast<int32_t>(cp))));
        }
        s = std::move(out);
        break;
      }
      case NormalizerStep::kPrepend:
        if (!s.empty()) s = n.text + s;
        break;
      case NormalizerStep::kReplace:
        if (n.regex) {
          std::string out;
          size_t pos = 0;
          for (const auto& [b, e] : n.regex->find_all(s)) {
            out.append(s, pos, b - pos);
            out.append(n.content);
            pos = e;
          }
          out.append(s, pos, std::string::npos);
          s = std::move(out);
        } else {
          replace_all(s, n.text, n.content);
        }
        break;
      case NormalizerStep::kStrip: {
        size_t b = 0, e = s.size();
        if (n.left) {
          while (b < e) {
            size_t j = b;
            if (!is_whitespace_cp(next_codepoint(s, j))) break;
            b = j;
          }
        }
        if (n.right) {
          while (e > b) {
            size_t k = e - 1;
            while (k > b && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
            size_t j = k;
            if (!is_whitespace_cp(next_codepoint(s, j))) break;
            e = k;
          }
        }
        s = s.substr(b, e - b);
        break;
      }
    }
  }
  return s;
}

std::vector<PipelineTokenizer::Piece> PipelineTokenizer::pre_tokenize(Segment seg) const {
  std::vector<Piece> pieces;
  pieces.push_back({std::move(seg.text), seg.at_start});
  for (const auto& step : pre_tokenizers) {
    std::vector<Piece> next;
    const auto split_with = [&](const Piece& p,
                                const std::vector<std::pair<size_t, size_t>>& matches,
                                SplitBehavior behavior, bool invert) {
      for (const auto& [b, e] : split_ranges(p.text.size(), matches, behavior, invert))
        next.push_back({p.text.substr(b, e - b), p.at_start && b == 0});
    };
    for (auto& p : pieces) {
      switch (step.kind) {
        case PreTokStep::kSplit:
          split_with(p,
                     step.regex ? step.regex->find_all(p.text) : find_literal(p.text, step.literal),
                     step.behavior, step.invert);
          break;
        case PreTokStep::kByteLevel: {
          std::string text = std::move(p.text);
          if (step.add_prefix_space && !text.starts_with(' ')) text.insert(text.begin(), ' ');
          std::vector<std::pair<size_t, size_t>> ranges;
          if (step.regex) {
            ranges = split_ranges(text.size(), step.regex->find_all(text), SplitBehavior::kIsolated,
                                  false);
          } else {
            ranges.emplace_back(0, text.size());
          }
          for (const auto& [b, e] : ranges) {
            std::string mapped;
            for (size_t k = b; k < e; ++k)
              mapped += byte_table_.encode(static_cast<uint8_t>(text[k]));
            next.push_back({std::move(mapped), p.at_start && b == 0});
          }
          break;
        }
        case PreTokStep::kMetaspace: {
          std::string text = std::move(p.text);
          replace_all(text, " ", step.replacement);
          const bool prepend = step.scheme == PrependScheme::kAlways ||
                               (step.scheme == PrependScheme::kFirst && p.at_start);
          if (prepend && !text.starts_with(step.replacement)) text = step.replacement + text;
          Piece q{std::move(text), p.at_start};
          if (step.split) {
            split_with(q, find_literal(q.text, step.replacement), SplitBehavior::kMergedWithNext,
                       false);
          } else {
            next.push_back(std::move(q));
          }
          break;
        }
        case PreTokStep::kDigits: {
          std::vector<std::pair<size_t, size_t>> matches;
          for (size_t k = 0; k < p.text.size(); ++k) {
            if (p.text[k] < '0' || p.text[k] > '9') continue;
            size_t e = k + 1;
            if (!step.individual_digits)
              while (e < p.text.size() && p.text[e] >= '0' && p.text[e] <= '9') ++e;
            matches.emplace_back(k, e);
            k = e - 1;
          }
          split_with(p, matches, SplitBehavior::kIsolated, false);
          break;
        }
        case PreTokStep::kWhitespaceSplit: {
          std::vector<std::pair<size_t, size_t>> matches;
          for (size_t k = 0; k < p.text.size();) {
            size_t j = k;
            if (is_whitespace_cp(next_codepoint(p.text, j))) {
              size_t e = j;
              while (e < p.text.size()) {
                size_t m = e;
                if (!is_whitespace_cp(next_codepoint(p.text, m))) break;
                e = m;
              }
              matches.emplace_back(k, e);
              k = e;
            } else {
              k = j;
            }
          }
          split_with(p, matches, SplitBehavior::kRemoved, false);
          break;
        }
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

// ---------------------------------------------------------------------------------------------
void PipelineTokenizer::model_encode(const std::string& word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (model_kind == ModelKind::kSpm) {
    spm_text(word, out);
    return;
  }
  if (ignore_merges) {
    const auto it = token_to_id_.find(word);
    if (it != token_to_id_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    const auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  bpe_word(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() >= kCacheMaxEntries) cache_.clear();
    cache_.emplace(word, std::move(ids));
  }
}

void PipelineTokenizer::bpe_word(const std::string& word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> syms;
  const auto add = [&](int32_t id) {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, -1, true});
    if (n > 0) syms[n - 1].next = n;
  };
  // Unknown characters: pending unk (fused if fuse_unk), emitted when a known char follows.
  int32_t pending_unk = -1;
  std::string piece;
  for (size_t i = 0; i < word.size();) {
    const size_t len =
        std::min(utf8_char_len(static_cast<unsigned char>(word[i])), word.size() - i);
    piece.clear();
    if (i > 0) piece += continuing_subword_prefix;
    piece.append(word, i, len);
    i += len;
    if (i == word.size()) piece += end_of_word_suffix;
    const auto it = token_to_id_.find(piece);
    if (it != token_to_id_.end()) {
      if (pending_unk >= 0) add(pending_unk);
      pending_unk = -1;
      add(it->second);
      continue;
    }
    if (byte_fallback) {
      bool all = true;
      for (const unsigned char c : piece) all = all && byte_ids_[c] >= 0;
      if (all) {
        for (const unsigned char c : piece) add(byte_ids_[c]);
        continue;
      }
    }
    if (unk_id >= 0) {
      if (pending_unk >= 0 && !fuse_unk) add(pending_unk);
      pending_unk = unk_id;
    }
  }
  if (pending_unk >= 0) add(pending_unk);

  struct Merge {
    int32_t rank, pos, new_id;
    bool operator<(const Merge& o) const {  // priority_queue top = lowest rank, then leftmost
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  const auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    const uint64_t key =
        (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
    const auto it = merges_.find(key);
    return it == merges_.end() ? nullptr : &it->second;
  };
  std::priority_queue<Merge> queue;
  for (size_t k = 0; k + 1 < syms.size(); ++k) {
    if (const auto* m = lookup(syms[k].id, syms[k + 1].id))
      queue.push({m->first, static_cast<int32_t>(k), m->second});
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& left = syms[top.pos];
    if (!left.alive || left.next < 0) continue;
    const int32_t right_pos = left.next;
    const Symbol right = syms[right_pos];
    const auto* m = lookup(left.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;
    left.id = top.new_id;
    left.next = right.next;
    syms[right_pos].alive = false;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (left.prev >= 0) {
      if (const auto* pm = lookup(syms[left.prev].id, left.id))
        queue.push({pm->first, left.prev, pm->second});
    }
    if (left.next >= 0) {
      if (const auto* nm = lookup(left.id, syms[left.next].id))
        queue.push({nm->first, top.pos, nm->second});
    }
  }
  for (int32_t k = syms.empty() ? -1 : 0; k >= 0; k = syms[k].next) out.push_back(syms[k].id);
}

// llama.cpp's SentencePiece BPE: repeatedly merge the adjacent pair whose concatenation is the
// vocabulary token with the highest score (leftmost on ties); unknown characters fall back to
// <0xNN> byte tokens, then to unk.
void PipelineTokenizer::spm_text(const std::string& text, std::vector<int32_t>& out) const {
  struct Symbol {
    size_t off, len;
    int32_t prev, next;
  };
  std::vector<Symbol> syms;
  for (size_t i = 0; i < text.size();) {
    const size_t len =
        std::min(utf8_char_len(static_cast<unsigned char>(text[i])), text.size() - i);
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({i, len, n - 1, -1});
    if (n > 0) syms[n - 1].next = n;
    i += len;
  }
  struct Bigram {
    float score;
    int32_t left, right;
    size_t size;
    bool operator<(const Bigram& o) const {  // top = highest score, then leftmost
      return score != o.score ? score < o.score : left > o.left;
    }
  };
  std::priority_queue<Bigram> queue;
  const auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const std::string_view merged(text.data() + syms[l].off, syms[l].len + syms[r].len);
    const auto it = token_to_id_.find(std::string(merged));
    if (it == token_to_id_.end()) return;
    const size_t id = static_cast<size_t>(it->second);
    const float score = id < scores_.size() ? scores_[id] : 0.0f;
    queue.push({score, l, r, merged.size()});
  };
  for (size_t k = 1; k < syms.size(); ++k)
    try_add(static_cast<int32_t>(k - 1), static_cast<int32_t>(k));
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = syms[b.left];
    Symbol& r = syms[b.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != b.size) continue;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
  for (int32_t k = syms.empty() ? -1 : 0; k >= 0; k = syms[k].next) {
    const std::string piece = text.substr(syms[k].off, syms[k].len);
    const auto it = token_to_id_.find(piece);
    if (it != token_to_id_.end()) {
      out.push_back(it->second);
      continue;
    }
    for (const unsigned char c : piece) {
      if (byte_ids_[c] >= 0) {
        out.push_back(byte_ids_[c]);
      } else if (unk_id >= 0) {
        out.push_back(unk_id);
      } else {
        throw Error("tokenizer: cannot encode byte " + std::to_string(c) +
                    ": no byte token and no unk token");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
std::vector<int32_t> PipelineTokenizer::encode(std::string_view text, bool add_special) const {
  if (const auto bad = utf8_first_invalid(text))
    throw Error("tokenizer: input text is not valid UTF-8 (byte offset " + std::to_string(*bad) +
                ")");
  std::vector<Segment> segs;
  segs.push_back({std::string(text), -1, true});
  split_added(segs, /*normalized_pass=*/false);
  for (auto& s : segs)
    if (s.added_id < 0) s.text = normalize(std::move(s.text));
  split_added(segs, /*normalized_pass=*/true);

  std::vector<int32_t> ids;
  if (add_special) {
    if (has_template) {
      ids = template_prefix;
    } else if (add_bos_ && bos_id_ >= 0) {
      ids.push_back(bos_id_);
    }
  }
  for (auto& s : segs) {
    if (s.added_id >= 0) {
      ids.push_back(s.added_id);
      continue;
    }
    if (s.text.empty()) continue;
    for (const auto& p : pre_tokenize(std::move(s))) model_encode(p.text, ids);
  }
  if (add_special && has_template)
    ids.insert(ids.end(), template_suffix.begin(), template_suffix.end());
  return ids;
}

std::string PipelineTokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (const int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !valid_[id])
      throw Error("tokenizer: cannot decode token id " + std::to_string(id) +
                  ": outside the vocabulary (size " + std::to_string(id_to_token_.size()) + ")");
    if (skip_special && special_[id]) continue;
    toks.push_back(id_to_token_[id]);
  }
  if (!has_decoder) {
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) {
      if (i > 0) out += ' ';
      out += toks[i];
    }
    return out;
  }
  for (const auto& d : decoders) {
    switch (d.kind) {
      case DecoderStep::kByteLevel: {
        std::string bytes;
        for (const auto& t : toks) {
          const size_t start = bytes.size();
          bool ok = true;
          for (size_t i = 0; i < t.size() && ok;) {
            const int b = byte_table_.decode(next_codepoint(t, i));
            if (b < 0) {
              ok = false;
            } else {
              bytes.push_back(static_cast<char>(b));
            }
          }
          if (!ok) {  // not byte-level text (e.g. an added token): keep it as is
            bytes.resize(start);
            bytes += t;
          }
        }
        toks.assign(1, utf8_lossy(bytes));
        break;
      }
      case DecoderStep::kReplace:
        for (auto& t : toks) replace_all(t, d.pattern, d.content);
        break;
      case DecoderStep::kByteFallback: {
        std::vector<std::string> next;
        std::string pending;
        size_t pending_count = 0;
        const auto flush = [&] {
          if (pending_count == 0) return;
          if (utf8_first_invalid(pending)) {
            for (size_t k = 0; k < pending_count; ++k) next.emplace_back(kReplacementChar);
          } else {
            next.push_back(pending);
          }
          pending.clear();
          pending_count = 0;
        };
        for (auto& t : toks) {
          const int b = parse_byte_token(t);
          if (b >= 0) {
            pending.push_back(static_cast<char>(b));
            ++pending_count;
          } else {
            flush();
            next.push_back(std::move(t));
          }
        }
        flush();
        toks = std::move(next);
        break;
      }
      case DecoderStep::kFuse: {
        std::string all;
        for (const auto& t : toks) all += t;
        toks.assign(1, std::move(all));
        break;
      }
      case DecoderStep::kStrip:
        for (auto& t : toks) {
          size_t b = 0, e = t.size();
          for (size_t k = 0; k < d.start && t.compare(b, d.content.size(), d.content) == 0 &&
                             b + d.content.size() <= e;
               ++k)
            b += d.content.size();
          for (size_t k = 0; k < d.stop && e >= b + d.content.size() &&
                             t.compare(e - d.content.size(), d.content.size(), d.content) == 0;
               ++k)
            e -= d.content.size();
          t = t.substr(b, e - b);
        }
        break;
      case DecoderStep::kMetaspace:
        for (size_t i = 0; i < toks.size(); ++i) {
          auto& t = toks[i];
          // As HF does: every replacement char of the first token is dropped, not only a
          // leading one.
          replace_all(t, d.pattern, i == 0 && d.scheme != PrependScheme::kNever ? "" : " ");
        }
        break;
    }
  }
  std::string out;
  for (const auto& t : toks) out += t;
  return out;
}

std::shared_ptr<Regex> gpt2_regex() { return std::make_shared<Regex>(kGpt2Pattern); }

}  // namespace redknot::tok
