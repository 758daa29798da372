// Tokenizer::from_gguf (llama.cpp SentencePiece-style BPE) on real vocabularies:
//  - stories260K's 512-token vocab, from both tok512.bin (llama2.c format) and the real
//    stories260K.gguf (read here by a minimal GGUF metadata reader, independent of src/loader);
//  - the Llama-2 (SentencePiece) and Llama-3 (byte-level "gpt2") vocabs of tokenizers/, as GGUF
//    would carry them, checked against the HF oracle rows.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "loader/checkpoint.h"
#include "tokenizer/tokenizer.h"

namespace redknot {
namespace {

namespace fs = std::filesystem;
const std::string kShared = REDKNOT_SHARED_DIR;
const std::string kStories = kShared + "/models/stories260K";
const std::string kGolden =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
  return s;
}

// llama2.c tokenizer file: int32 max_len, then per token {float score, int32 len, bytes}.
// The exporter wrote pieces with spaces for U+2581 and "\n<s>\n" style control tokens.
GgufVocab vocab_from_tok512(const std::string& path) {
  const std::string data = read_file(path);
  size_t off = 4;
  const auto take = [&](void* dst, size_t n) {
    if (off + n > data.size()) throw std::runtime_error("truncated " + path);
    std::memcpy(dst, data.data() + off, n);
    off += n;
  };
  GgufVocab v;
  v.model = "llama";
  while (off < data.size()) {
    float score = 0;
    int32_t len = 0;
    take(&score, 4);
    take(&len, 4);
    std::string piece(static_cast<size_t>(len), '\0');
    take(piece.data(), piece.size());
    const auto id = static_cast<int32_t>(v.tokens.size());
    int32_t type = 1;
    if (id == 0) {
      piece = "<unk>", type = 2;
    } else if (id == 1) {
      piece = "<s>", type = 3;
    } else if (id == 2) {
      piece = "</s>", type = 3;
    } else if (piece.size() == 6 && piece.starts_with("<0x") && piece.back() == '>') {
      type = 6;
    } else {
      piece = replace_all(piece, " ", "\xE2\x96\x81");
    }
    v.tokens.push_back(piece);
    v.scores.push_back(score);
    v.token_types.push_back(type);
  }
  v.unk_id = 0, v.bos_id = 1, v.eos_id = 2;
  return v;
}

// Just enough of GGUF v2/v3 to pull the tokenizer.ggml.* metadata.
class MiniGguf {
 public:
  explicit MiniGguf(const std::string& path) : data_(read_file(path)) {}

  GgufVocab vocab() {
    if (data_.substr(0, 4) != "GGUF") throw std::runtime_error("not GGUF");
    off_ = 4;
    const uint32_t version = get<uint32_t>();
    if (version < 2) throw std::runtime_error("old GGUF");
    get<uint64_t>();  // tensor count
    const uint64_t kv_count = get<uint64_t>();
    GgufVocab v;
    for (uint64_t i = 0; i < kv_count; ++i) {
      const std::string key = str();
      const uint32_t type = get<uint32_t>();
      if (key == "tokenizer.ggml.model") {
        v.model = str();
      } else if (key == "tokenizer.ggml.tokens") {
        array_header(8);
        for (uint64_t k = 0, n = count_; k < n; ++k) v.tokens.push_back(str());
      } else if (key == "tokenizer.ggml.scores") {
        array_header(6);
        for (uint64_t k = 0, n = count_; k < n; ++k) v.scores.push_back(get<float>());
      } else if (key == "tokenizer.ggml.token_type") {
        array_header(5);
        for (uint64_t k = 0, n = count_; k < n; ++k) v.token_types.push_back(get<int32_t>());
      } else if (key == "tokenizer.ggml.bos_token_id") {
        v.bos_id = static_cast<int32_t>(get<uint32_t>());
      } else if (key == "tokenizer.ggml.eos_token_id") {
        v.eos_id = static_cast<int32_t>(get<uint32_t>());
      } else if (key == "tokenizer.ggml.unknown_token_id") {
        v.unk_id = static_cast<int32_t>(get<uint32_t>());
      } else if (key == "tokenizer.ggml.add_bos_token") {
        v.add_bos = get<uint8_t>() != 0;
      } else if (key == "tokenizer.ggml.add_space_prefix") {
        v.add_space_prefix = get<uint8_t>() != 0;
      } else {
        skip(type);
      }
    }
    return v;
  }

 private:
  template <typename T>
  T get() {
    if (off_ + sizeof(T) > data_.size()) throw std::runtime_error("truncated GGUF");
    T x;
    std::memcpy(&x, data_.data() + off_, sizeof(T));
    off_ += sizeof(T);
    return x;
  }
  std::string str() {
    const auto n = get<uint64_t>();
    if (off_ + n > data_.size()) throw std::runtime_error("truncated GGUF string");
    std::string s = data_.substr(off_, n);
    off_ += n;
    return s;
  }
  void array_header(uint32_t want) {
    if (get<uint32_t>() != want) throw std::runtime_error("unexpected GGUF array type");
    count_ = get<uint64_t>();
  }
  void skip(uint32_t type) {
    static constexpr size_t kSizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type == 8) {
      str();
    } else if (type == 9) {
      const uint32_t inner = get<uint32_t>();
      const uint64_t n = get<uint64_t>();
      for (uint64_t k = 0; k < n; ++k) skip(inner);
    } else if (type < 13) {
      off_ += kSizes[type];
    } else {
      throw std::runtime_error("bad GGUF value type");
    }
  }
  std::string data_;
  size_t off_ = 0;
  uint64_t count_ = 0;
};

class GgufVocabTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kShared)) GTEST_SKIP() << "shared test data not found at " << kShared;
  }
};

TEST_F(GgufVocabTest, Tok512MatchesTheRealGgufVocab) {
  const GgufVocab a = vocab_from_tok512(kStories + "/tok512.bin");
  const GgufVocab b = MiniGguf(kStories + "/stories260K.gguf").vocab();
  EXPECT_EQ(b.model, "llama");
  ASSERT_EQ(a.tokens.size(), 512u);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.scores, b.scores);
  EXPECT_EQ(a.token_types, b.token_types);
  EXPECT_EQ(b.bos_id, 1);
  EXPECT_EQ(b.eos_id, 2);
}

TEST_F(GgufVocabTest, Stories260KEncodeDecode) {
  const auto tok = Tokenizer::from_gguf(MiniGguf(kStories + "/stories260K.gguf").vocab());
  EXPECT_EQ(tok->vocab_size(), 512);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_ids(), std::vector<int32_t>{2});
  EXPECT_TRUE(tok->add_bos());

  const std::string text = "Once upon a time, there was a little girl named Lily.";
  const auto ids = tok->encode(text);
  EXPECT_EQ(tok->decode(ids), text);
  std::string pieces;
  for (const int32_t id : ids) pieces += tok->id_to_token(id) + "|";
  // Greedy score merging on this 512-piece vocab: whole-word pieces where the vocab has them
  // ("girl" is not a piece; "Lily" is).
  EXPECT_EQ(pieces, replace_all("_Once|_upon|_a|_time|,|_there|_was|_a|_little|_g|ir|l|_named|"
                                "_Lily|.|",
                                "_", "\xE2\x96\x81"));
  const auto with_bos = tok->encode(text, /*add_special=*/true);
  ASSERT_EQ(with_bos.size(), ids.size() + 1);
  EXPECT_EQ(with_bos[0], 1);
  EXPECT_EQ(tok->decode(with_bos, /*skip_special=*/true), text);

  EXPECT_EQ(tok->decode(tok->encode(kGolden)), kGolden);
  // Characters outside the vocab go through <0xNN> byte tokens and come back intact.
  const std::string exotic = "Zoë said \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80!\n\ttab";
  const auto exotic_ids = tok->encode(exotic);
  EXPECT_EQ(tok->decode(exotic_ids), exotic);
  std::string streamed;
  StreamDecoder stream(*tok);
  for (const int32_t id : exotic_ids) streamed += stream.push(id);
  streamed += stream.finish();
  EXPECT_EQ(streamed, exotic);
  // Control tokens written in the text are matched as such.
  const auto ctl = tok->encode("<s>Hi</s>");
  ASSERT_GE(ctl.size(), 3u);
  EXPECT_EQ(ctl.front(), 1);
  EXPECT_EQ(ctl.back(), 2);
  EXPECT_THROW(tok->encode("bad \xC3"), Error);
}

TEST_F(GgufVocabTest, BadVocabThrows) {
  GgufVocab v;
  v.model = "llama";
  EXPECT_THROW(Tokenizer::from_gguf(v), Error);  // no tokens
  v.tokens = {"<unk>", "a"};
  v.scores = {0.0f};
  EXPECT_THROW(Tokenizer::from_gguf(v), Error);  // score count mismatch
  v.scores = {0.0f, 0.0f};
  v.bos_id = 7;
  EXPECT_THROW(Tokenizer::from_gguf(v), Error);  // bos out of range
  v.bos_id = -1;
  v.model = "t5";
  EXPECT_THROW(Tokenizer::from_gguf(v), Error);  // unsupported model
}

// The Llama-2-style file is SentencePiece BPE converted to HF merges ordered by piece score.
// Giving each piece the score -rank of the merge that creates it, llama.cpp's score-greedy
// merging must reproduce HF's ids on the oracle rows.
TEST_F(GgufVocabTest, SpmOnLlama2VocabMatchesHfOracle) {
  const auto j = nlohmann::json::parse(read_file(kShared + "/tokenizers/llama2/tokenizer.json"));
  GgufVocab v;
  v.model = "llama";
  const auto& vocab = j["model"]["vocab"];
  v.tokens.resize(vocab.size());
  for (const auto& [tok, id] : vocab.items()) v.tokens[id.get<size_t>()] = tok;
  v.scores.assign(v.tokens.size(), -1e9f);
  float rank = 0;
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m;
    const std::string merged = s.substr(0, s.find(' ')) + s.substr(s.find(' ') + 1);
    const auto id = vocab[merged].get<size_t>();
    v.scores[id] = std::max(v.scores[id], -rank);
    rank += 1;
  }
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    const std::string& t = v.tokens[id];
    const bool byte = t.size() == 6 && t.starts_with("<0x");
    v.token_types.push_back(id == 0 ? 2 : id < 3 ? 3 : byte ? 6 : 1);
  }
  v.unk_id = 0, v.bos_id = 1, v.eos_id = 2;
  const auto tok = Tokenizer::from_gguf(v);
  const auto rows = nlohmann::json::parse(read_file(kShared + "/refs/tokenizer-llama2.json"));
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string text = rows[i]["text"];
    const auto ids = rows[i]["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->encode(text), ids) << "row " << i << ": " << text.substr(0, 60);
    EXPECT_EQ(tok->decode(ids), rows[i]["decoded"].get<std::string>()) << "row " << i;
  }
}

// A GGUF "gpt2" (byte-level BPE) vocab built from the Llama-3 tokenizer.json: the GGUF path uses
// the Llama-3 split pattern, so it must reproduce HF's ids on the Llama-3 oracle rows.
TEST_F(GgufVocabTest, Gpt2VocabFromLlama3MatchesHfOracle) {
  const auto j = nlohmann::json::parse(read_file(kShared + "/tokenizers/llama3/tokenizer.json"));
  GgufVocab v;
  v.model = "gpt2";
  const auto& vocab = j["model"]["vocab"];
  const size_t n = vocab.size() + j["added_tokens"].size();
  v.tokens.resize(n);
  v.token_types.assign(n, 1);
  for (const auto& [tok, id] : vocab.items()) v.tokens[id.get<size_t>()] = tok;
  for (const auto& a : j["added_tokens"]) {
    v.tokens[a["id"].get<size_t>()] = a["content"];
    v.token_types[a["id"].get<size_t>()] = 3;
  }
  for (const auto& m : j["model"]["merges"]) v.merges.push_back(m);
  v.bos_id = 128000, v.eos_id = 128001;
  const auto tok = Tokenizer::from_gguf(v);
  const auto rows = nlohmann::json::parse(read_file(kShared + "/refs/tokenizer-llama3.json"));
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string text = rows[i]["text"];
    const auto ids = rows[i]["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->encode(text), ids) << "row " << i << ": " << text.substr(0, 60);
    EXPECT_EQ(tok->decode(ids), rows[i]["decoded"].get<std::string>()) << "row " << i;
  }
  EXPECT_EQ(tok->encode("hi", /*add_special=*/true).front(), 128000);
}

}  // namespace
}  // namespace redknot
