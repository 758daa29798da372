// HF tokenizer.json tokenizers against oracle vectors produced by HF `tokenizers`
// (/work/shared/refs/tokenizer-<name>.json: {text, ids, decoded} rows).
#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace redknot {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kShared = REDKNOT_SHARED_DIR;

struct RefRow {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded;
};

std::string tokenizer_path(const std::string& name) {
  return kShared + "/tokenizers/" + name + "/tokenizer.json";
}

std::vector<RefRow> load_refs(const std::string& name) {
  std::ifstream in(kShared + "/refs/tokenizer-" + name + ".json");
  const json j = json::parse(in);
  std::vector<RefRow> rows;
  for (const auto& r : j)
    rows.push_back({r["text"], r["ids"].get<std::vector<int32_t>>(), r["decoded"]});
  return rows;
}

// Loads each tokenizer once per test binary (the Qwen3 file is 11 MB).
const Tokenizer& get_tokenizer(const std::string& name) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto& t = cache[name];
  if (!t) t = Tokenizer::from_hf_file(tokenizer_path(name));
  return *t;
}

std::string printable(const std::string& s) {
  std::string out;
  for (const unsigned char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20) {
      out += "\\x" + std::to_string(c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out.size() > 80 ? out.substr(0, 80) + "..." : out;
}

std::string replaced(const std::string& s, const std::string& from, const std::string& to) {
  std::string out;
  size_t pos = 0;
  for (size_t hit = s.find(from); hit != std::string::npos; hit = s.find(from, pos)) {
    out.append(s, pos, hit - pos);
    out += to;
    pos = hit + from.size();
  }
  out.append(s, pos, std::string::npos);
  return out;
}

class RefTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!fs::exists(kShared)) GTEST_SKIP() << "shared test data not found at " << kShared;
  }
};

TEST_P(RefTest, EncodeMatchesEveryRow) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  const auto rows = load_refs(GetParam());
  ASSERT_GT(rows.size(), 20u);
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(tok.encode(rows[i].text), rows[i].ids)
        << GetParam() << " row " << i << ": \"" << printable(rows[i].text) << "\"";
  }
}

TEST_P(RefTest, DecodeMatchesEveryRow) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  const auto rows = load_refs(GetParam());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(tok.decode(rows[i].ids), rows[i].decoded)
        << GetParam() << " row " << i << ": \"" << printable(rows[i].text) << "\"";
  }
}

TEST_P(RefTest, StreamingEqualsDecodeForEveryRow) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  const auto rows = load_refs(GetParam());
  for (const bool skip : {false, true}) {
    for (size_t i = 0; i < rows.size(); ++i) {
      StreamDecoder stream(tok, skip);
      std::string text;
      for (const int32_t id : rows[i].ids) {
        const std::string piece = stream.push(id);
        // Each piece is final text: whole UTF-8 characters only.
        EXPECT_FALSE(tok::utf8_first_invalid(piece).has_value()) << "row " << i;
        text += piece;
      }
      text += stream.finish();
      EXPECT_EQ(text, tok.decode(rows[i].ids, skip))
          << GetParam() << " row " << i << " skip_special=" << skip;
    }
  }
}

TEST_P(RefTest, LongRowIsFast) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  const auto rows = load_refs(GetParam());
  // A fresh tokenizer so that the word cache starts empty.
  const auto fresh = Tokenizer::from_hf_file(tokenizer_path(GetParam()));
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = fresh->encode(rows.back().text);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(ids, rows.back().ids);
  std::printf("%s: cold encode of %zu bytes -> %zu ids in %.2f ms\n", GetParam().c_str(),
              rows.back().text.size(), ids.size(), ms);
  EXPECT_LT(ms, 2000.0) << "encode of " << rows.back().text.size() << " bytes took " << ms << " ms";
  EXPECT_EQ(tok.decode(ids), rows.back().decoded);
}

TEST_P(RefTest, InvalidUtf8InputThrows) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  for (const std::string& bad :
       {std::string("\xff"), std::string("abc\xc3"), std::string("\xed\xa0\x80"),
        std::string("\xc0\xaf"), std::string("ok \xf0\x9f\x98"), std::string("\x80 x")}) {
    EXPECT_THROW(tok.encode(bad), Error) << printable(bad);
  }
  EXPECT_TRUE(tok.encode("").empty());
}

TEST_P(RefTest, UnknownIdThrows) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  const std::vector<int32_t> neg = {-1};
  const std::vector<int32_t> big = {tok.vocab_size() + 1000};
  EXPECT_THROW(tok.decode(neg), Error);
  EXPECT_THROW(tok.decode(big), Error);
  EXPECT_THROW(tok.id_to_token(tok.vocab_size()), Error);
  StreamDecoder stream(tok);
  EXPECT_THROW(stream.push(-5), Error);
}

TEST_P(RefTest, TokenLookupsAgree) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  const auto rows = load_refs(GetParam());
  for (const int32_t id : rows.front().ids) {
    const auto back = tok.token_to_id(tok.id_to_token(id));
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(*back, id);
  }
  EXPECT_FALSE(tok.token_to_id("this is surely not a token").has_value());
}

// Random mixed-script text: decode(encode(text)) gives the text back (these files have no
// lossy normalization except Qwen's NFC, and the text below is already NFC), and streaming
// equals decoding.
TEST_P(RefTest, RandomTextRoundTrips) {
  const Tokenizer& tok = get_tokenizer(GetParam());
  const std::vector<std::string> pool = {"a",
                                         "b",
                                         "Z",
                                         "e",
                                         "th",
                                         " ",
                                         " ",
                                         "  ",
                                         "\n",
                                         "\t",
                                         "\r\n",
                                         "0",
                                         "7",
                                         "42",
                                         ".",
                                         ",",
                                         "'s",
                                         "!",
                                         "?",
                                         "#",
                                         "\xC3\xA9",
                                         "\xC3\xBC",
                                         "\xE4\xB8\xAD",
                                         "\xE6\x96\x87",
                                         "\xED\x95\x9C",
                                         "\xD0\x9F",
                                         "\xF0\x9F\x98\x80",
                                         "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",
                                         "\xE2\x9D\xA4\xEF\xB8\x8F",
                                         "\xE2\x96\x81",
                                         "<",
                                         "|",
                                         ">",
                                         "\xCC\x81",
                                         "\xEF\xBF\xBD"};
  uint32_t state = 12345;
  const auto next = [&] {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
  };
  for (int trial = 0; trial < 300; ++trial) {
    std::string text;
    const size_t n = 1 + next() % 40;
    for (size_t k = 0; k < n; ++k) text += pool[next() % pool.size()];
    // U+0301 after a letter would be composed by NFC (Qwen); keep it after a space only.
    if (GetParam() == "qwen3") text = replaced(text, "\xCC\x81", " \xCC\x81");
    const auto ids = tok.encode(text);
    // SentencePiece cannot tell a written U+2581 from a space.
    const std::string expected =
        GetParam() == "llama2" ? replaced(text, "\xE2\x96\x81", " ") : text;
    EXPECT_EQ(tok.decode(ids), expected) << "trial " << trial << ": " << printable(text);
    StreamDecoder stream(tok);
    std::string streamed;
    for (const int32_t id : ids) streamed += stream.push(id);
    streamed += stream.finish();
    EXPECT_EQ(streamed, tok.decode(ids)) << "trial " << trial;
  }
}

INSTANTIATE_TEST_SUITE_P(Hf, RefTest, ::testing::Values("qwen3", "llama3", "llama2"));

class HfConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kShared)) GTEST_SKIP() << "shared test data not found at " << kShared;
  }
};

TEST_F(HfConfigTest, Qwen3SpecialTokensAndConfig) {
  const Tokenizer& tok = get_tokenizer("qwen3");
  EXPECT_EQ(tok.vocab_size(), 151669);
  EXPECT_EQ(tok.token_to_id("<|im_end|>"), 151645);
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{151645});
  EXPECT_EQ(tok.bos_id(), -1);  // bos_token is null
  EXPECT_FALSE(tok.add_bos());
  EXPECT_TRUE(tok.is_special(151645));
  EXPECT_FALSE(tok.is_special(151657));  // <tool_call> is a non-special added token
  EXPECT_FALSE(tok.is_special(872));
  EXPECT_NE(tok.chat_template().find("<|im_start|>"), std::string::npos);
  // The ByteLevel post-processor adds nothing.
  EXPECT_EQ(tok.encode("Hello world", true), tok.encode("Hello world", false));
  // Non-special added tokens are matched in text too.
  const auto ids = tok.encode("<think>x</think>");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[0], *tok.token_to_id("<think>"));
  EXPECT_EQ(ids[2], *tok.token_to_id("</think>"));
}

TEST_F(HfConfigTest, Qwen3SkipSpecial) {
  const Tokenizer& tok = get_tokenizer("qwen3");
  const auto ids = tok.encode("<|im_start|>user\nhi<|im_end|>");
  EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), "user\nhi");
}

TEST_F(HfConfigTest, Llama3Config) {
  const Tokenizer& tok = get_tokenizer("llama3");
  EXPECT_EQ(tok.bos_id(), 128000);
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{128001});
  EXPECT_TRUE(tok.is_special(128000));
  EXPECT_FALSE(tok.chat_template().empty());
}

TEST_F(HfConfigTest, Llama2TemplateAddsBos) {
  const Tokenizer& tok = get_tokenizer("llama2");
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{2});
  EXPECT_TRUE(tok.add_bos());
  const auto plain = tok.encode("Hello world");
  auto with_bos = plain;
  with_bos.insert(with_bos.begin(), 1);
  EXPECT_EQ(tok.encode("Hello world", true), with_bos);
  EXPECT_EQ(tok.decode(with_bos, /*skip_special=*/true), "Hello world");
}

TEST_F(HfConfigTest, InvalidBytesDecodeToReplacementChar) {
  // Byte-level: lone lead byte 0xF0 (mapped to U+00F0 in the GPT-2 alphabet).
  const Tokenizer& l3 = get_tokenizer("llama3");
  const auto f0 = l3.token_to_id("\xC3\xB0");
  ASSERT_TRUE(f0.has_value());
  const std::vector<int32_t> lone = {*f0};
  EXPECT_EQ(l3.decode(lone), "\xEF\xBF\xBD");
  // Byte fallback: every byte of an invalid group becomes U+FFFD.
  const Tokenizer& l2 = get_tokenizer("llama2");
  const std::vector<int32_t> bytes = {*l2.token_to_id("<0xF0>"), *l2.token_to_id("<0x9F>")};
  EXPECT_EQ(l2.decode(bytes), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST_F(HfConfigTest, StreamNeverSplitsCharacters) {
  const Tokenizer& l2 = get_tokenizer("llama2");
  // U+1F600 as four byte-fallback tokens: nothing is final until the group is complete.
  std::vector<int32_t> ids = {*l2.token_to_id("<0xF0>"), *l2.token_to_id("<0x9F>"),
                              *l2.token_to_id("<0x98>"), *l2.token_to_id("<0x80>")};
  const auto hello = l2.encode("hi");
  ids.insert(ids.end(), hello.begin(), hello.end());
  StreamDecoder stream(l2);
  std::string text;
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string piece = stream.push(ids[i]);
    if (i < 4) {
      EXPECT_EQ(piece, "") << i;
    }
    text += piece;
  }
  text += stream.finish();
  EXPECT_EQ(text, l2.decode(ids));
  EXPECT_EQ(text, "\xF0\x9F\x98\x80 hi");
  // An incomplete character at the end comes out of finish() as U+FFFD, as decode() does.
  StreamDecoder tail(l2);
  EXPECT_EQ(tail.push(ids[0]), "");
  EXPECT_EQ(tail.finish(), "\xEF\xBF\xBD");
}

// ---- hand-written files: malformed ones, and small ones exercising single pipeline steps ----
class TempFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("rk_tok_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& content) {
    const auto p = (dir_ / "tokenizer.json").string();
    std::ofstream(p) << content;
    return p;
  }
  void expect_error_naming_path(const std::string& content, const std::string& fragment) {
    const std::string p = write(content);
    try {
      Tokenizer::from_hf_file(p);
      ADD_FAILURE() << "no error for: " << content;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(p), std::string::npos) << msg;
      EXPECT_NE(msg.find(fragment), std::string::npos) << msg;
    }
  }
  fs::path dir_;
};

TEST_F(TempFileTest, MissingFile) {
  const std::string p = (dir_ / "nope.json").string();
  try {
    Tokenizer::from_hf_file(p);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos);
  }
}

TEST_F(TempFileTest, Errors) {
  expect_error_naming_path("{ not json", "invalid JSON");
  expect_error_naming_path("[1, 2]", "object");
  expect_error_naming_path(R"({"added_tokens": []})", "model");
  expect_error_naming_path(R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})", "WordPiece");
  expect_error_naming_path(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})",
                           "merge");
  expect_error_naming_path(R"({"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}})",
                           "vocab");
  expect_error_naming_path(
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated"}})",
      "regex");
  expect_error_naming_path(
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": {"type": "Foo"}})",
      "Foo");
  expect_error_naming_path(R"({"model": {"type": "BPE", "vocab": {"a": 99999999999}}})",
                           "out of range");
  expect_error_naming_path(
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "post_processor": {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "a", "type_id": 0}}],
                             "special_tokens": {"a": {"id": "a", "ids": ["x"]}}}})",
      "malformed");
}

// A minimal hand-written BPE file: the pipeline pieces behave as HF documents them.
TEST_F(TempFileTest, TinyBpeWithPairMergesAndUnk) {
  const std::string p = write(R"({
    "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true,
              "vocab": {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "bc": 6},
              "merges": [["a", "b"], ["ab", "c"], ["b", "c"]]},
    "added_tokens": [{"id": 7, "content": "<x>", "special": true, "lstrip": true,
                      "rstrip": false, "single_word": false, "normalized": false}],
    "pre_tokenizer": {"type": "WhitespaceSplit"},
    "decoder": null})");
  const auto tok = Tokenizer::from_hf_file(p);
  EXPECT_EQ(tok->encode("abc bca"), (std::vector<int32_t>{5, 6, 1}));
  EXPECT_EQ(tok->encode("zzab"), (std::vector<int32_t>{0, 4}));          // unknown chars fused
  EXPECT_EQ(tok->encode("ab   <x>c"), (std::vector<int32_t>{4, 7, 3}));  // lstrip eats spaces
  EXPECT_EQ(tok->decode(std::vector<int32_t>{5, 7, 1}), "abc <x> a");    // no decoder: join " "
  EXPECT_EQ(tok->bos_id(), -1);
}

// Metaspace pre-tokenizer (newer Mistral/Llama files): prepend "first" only at input offset 0,
// so not after a special token; the decoder drops the first token's U+2581.
TEST_F(TempFileTest, MetaspacePrependSchemes) {
  const auto make = [&](const std::string& scheme, bool split) {
    return Tokenizer::from_hf_file(write(R"({
      "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true,
                "vocab": {"<unk>": 0, "<s>": 1, "\u2581": 2, "H": 3, "i": 4, "\u2581H": 5,
                          "\u2581Hi": 6, "Hi": 7, "<0x21>": 8},
                "merges": ["\u2581 H", "\u2581H i", "H i"]},
      "added_tokens": [{"id": 1, "content": "<s>", "special": true, "lstrip": false,
                        "rstrip": false, "single_word": false, "normalized": false}],
      "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                        "prepend_scheme": ")" +
                                         scheme + R"(", "split": )" + (split ? "true" : "false") +
                                         R"(},
      "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": ")" +
                                         scheme + R"(", "split": true}})"));
  };
  const auto first = make("first", false);
  EXPECT_EQ(first->encode("Hi"), (std::vector<int32_t>{6}));
  EXPECT_EQ(first->encode("<s>Hi"), (std::vector<int32_t>{1, 7}));
  EXPECT_EQ(first->encode("Hi Hi!"), (std::vector<int32_t>{6, 6, 8}));
  EXPECT_EQ(first->decode(std::vector<int32_t>{6, 6}), "Hi Hi");
  EXPECT_EQ(first->decode(std::vector<int32_t>{2, 2, 6}), "  Hi");
  const auto always = make("always", true);
  EXPECT_EQ(always->encode("<s>Hi"), (std::vector<int32_t>{1, 6}));
  // "\u2581\u2581Hi" already starts with U+2581; split keeps each one with what follows.
  EXPECT_EQ(always->encode("  Hi"), (std::vector<int32_t>{2, 6}));
  const auto never = make("never", true);
  EXPECT_EQ(never->encode("Hi Hi"), (std::vector<int32_t>{7, 6}));
  EXPECT_EQ(never->decode(std::vector<int32_t>{7, 6}), "Hi Hi");
  for (const auto* t : {first.get(), always.get(), never.get()}) {
    const std::vector<int32_t> ids = {2, 6, 1, 7, 8, 2, 2, 6};
    StreamDecoder stream(*t);
    std::string text;
    for (const int32_t id : ids) text += stream.push(id);
    text += stream.finish();
    EXPECT_EQ(text, t->decode(ids));
  }
}

}  // namespace
}  // namespace redknot
