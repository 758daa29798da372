// Loaders: HF tokenizer.json (+ tokenizer_config.json) and GGUF vocabularies, both translated
// into a tok::PipelineTokenizer.
#include "tokenizer/tokenizer.h"

#include <climits>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "loader/checkpoint.h"
#include "tokenizer/pipeline.h"

namespace redknot {
namespace {

using nlohmann::json;
using tok::DecoderStep;
using tok::NormalizerStep;
using tok::PipelineTokenizer;
using tok::PrependScheme;
using tok::PreTokStep;
using tok::SplitBehavior;

// Reads and parses a JSON file; every failure names the file.
json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw Error(path + ": invalid JSON: " + e.what());
  }
}

// Field accessors that report the file and the field on a type mismatch.
class JsonReader {
 public:
  explicit JsonReader(std::string path) : path_(std::move(path)) {}
  [[noreturn]] void fail(const std::string& what) const { throw Error(path_ + ": " + what); }

  const json& obj(const json& j, const char* key) const {
    if (!j.is_object() || !j.contains(key) || !j[key].is_object())
      fail(std::string("missing or non-object \"") + key + "\"");
    return j[key];
  }
  std::string str(const json& j, const char* key, const std::string& def = "") const {
    if (!j.is_object() || !j.contains(key) || j[key].is_null()) return def;
    if (!j[key].is_string()) fail(std::string("\"") + key + "\" must be a string");
    return j[key].get<std::string>();
  }
  bool flag(const json& j, const char* key, bool def) const {
    if (!j.is_object() || !j.contains(key) || j[key].is_null()) return def;
    if (!j[key].is_boolean()) fail(std::string("\"") + key + "\" must be a boolean");
    return j[key].get<bool>();
  }
  int64_t integer(const json& j, const char* key, int64_t def) const {
    if (!j.is_object() || !j.contains(key) || j[key].is_null()) return def;
    if (!j[key].is_number_integer()) fail(std::string("\"") + key + "\" must be an integer");
    return j[key].get<int64_t>();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

PrependScheme parse_scheme(const JsonReader& r, const json& j) {
  if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
    const std::string s = r.str(j, "prepend_scheme");
    if (s == "first") return PrependScheme::kFirst;
    if (s == "always") return PrependScheme::kAlways;
    if (s == "never") return PrependScheme::kNever;
    r.fail("unknown Metaspace prepend_scheme \"" + s + "\"");
  }
  return r.flag(j, "add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

// {"String": s} or {"Regex": r}: literal text, or a compiled regex.
void parse_pattern(const JsonReader& r, const json& j, std::string& literal,
                   std::shared_ptr<tok::Regex>& regex) {
  if (!j.is_object()) r.fail("pattern must be an object");
  if (j.contains("String")) {
    literal = r.str(j, "String");
  } else if (j.contains("Regex")) {
    try {
      regex = std::make_shared<tok::Regex>(r.str(j, "Regex"));
    } catch (const Error& e) {
      r.fail(e.what());
    }
  } else {
    r.fail("pattern needs \"String\" or \"Regex\"");
  }
}

void parse_normalizer(const JsonReader& r, const json& j, std::vector<NormalizerStep>& out) {
  if (j.is_null()) return;
  const std::string type = r.str(j, "type");
  if (type == "Sequence") {
    if (!j.contains("normalizers") || !j["normalizers"].is_array())
      r.fail("normalizer Sequence needs \"normalizers\"");
    for (const auto& n : j["normalizers"]) parse_normalizer(r, n, out);
    return;
  }
  NormalizerStep s{NormalizerStep::kNfc, {}, {}, nullptr};
  if (type == "NFC") {
    s.kind = NormalizerStep::kNfc;
  } else if (type == "NFD") {
    s.kind = NormalizerStep::kNfd;
  } else if (type == "NFKC") {
    s.kind = NormalizerStep::kNfkc;
  } else if (type == "NFKD") {
    s.kind = NormalizerStep::kNfkd;
  } else if (type == "Lowercase") {
    s.kind = NormalizerStep::kLowercase;
  } else if (type == "Prepend") {
    s.kind = NormalizerStep::kPrepend;
    s.text = r.str(j, "prepend");
  } else if (type == "Replace") {
    s.kind = NormalizerStep::kReplace;
    if (!j.contains("pattern")) r.fail("Replace normalizer needs \"pattern\"");
    parse_pattern(r, j["pattern"], s.text, s.regex);
    s.content = r.str(j, "content");
  } else if (type == "Strip") {
    s.kind = NormalizerStep::kStrip;
    s.left = r.flag(j, "strip_left", true);
    s.right = r.flag(j, "strip_right", true);
  } else {
    r.fail("unsupported normalizer type \"" + type + "\"");
  }
  out.push_back(std::move(s));
}

void parse_pre_tokenizer(const JsonReader& r, const json& j, std::vector<PreTokStep>& out) {
  if (j.is_null()) return;
  const std::string type = r.str(j, "type");
  if (type == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array())
      r.fail("pre_tokenizer Sequence needs \"pretokenizers\"");
    for (const auto& p : j["pretokenizers"]) parse_pre_tokenizer(r, p, out);
    return;
  }
  PreTokStep s{};
  if (type == "Split") {
    s.kind = PreTokStep::kSplit;
    if (!j.contains("pattern")) r.fail("Split pre_tokenizer needs \"pattern\"");
    parse_pattern(r, j["pattern"], s.literal, s.regex);
    const std::string b = r.str(j, "behavior", "Isolated");
    if (b == "Isolated") {
      s.behavior = SplitBehavior::kIsolated;
    } else if (b == "Removed") {
      s.behavior = SplitBehavior::kRemoved;
    } else if (b == "MergedWithPrevious") {
      s.behavior = SplitBehavior::kMergedWithPrevious;
    } else if (b == "MergedWithNext") {
      s.behavior = SplitBehavior::kMergedWithNext;
    } else if (b == "Contiguous") {
      s.behavior = SplitBehavior::kContiguous;
    } else {
      r.fail("unknown Split behavior \"" + b + "\"");
    }
    s.invert = r.flag(j, "invert", false);
  } else if (type == "ByteLevel") {
    s.kind = PreTokStep::kByteLevel;
    s.add_prefix_space = r.flag(j, "add_prefix_space", true);
    if (r.flag(j, "use_regex", true)) s.regex = tok::gpt2_regex();
  } else if (type == "Metaspace") {
    s.kind = PreTokStep::kMetaspace;
    s.replacement = r.str(j, "replacement", "\xE2\x96\x81");
    s.scheme = parse_scheme(r, j);
    s.split = r.flag(j, "split", true);
  } else if (type == "Digits") {
    s.kind = PreTokStep::kDigits;
    s.individual_digits = r.flag(j, "individual_digits", false);
  } else if (type == "WhitespaceSplit") {
    s.kind = PreTokStep::kWhitespaceSplit;
  } else {
    r.fail("unsupported pre_tokenizer type \"" + type + "\"");
  }
  out.push_back(std::move(s));
}

void parse_decoder(const JsonReader& r, const json& j, std::vector<DecoderStep>& out) {
  if (j.is_null()) return;
  const std::string type = r.str(j, "type");
  if (type == "Sequence") {
    if (!j.contains("decoders") || !j["decoders"].is_array())
      r.fail("decoder Sequence needs \"decoders\"");
    for (const auto& d : j["decoders"]) parse_decoder(r, d, out);
    return;
  }
  DecoderStep s{};
  if (type == "ByteLevel") {
    s.kind = DecoderStep::kByteLevel;
  } else if (type == "Replace") {
    s.kind = DecoderStep::kReplace;
    std::shared_ptr<tok::Regex> regex;
    if (!j.contains("pattern")) r.fail("Replace decoder needs \"pattern\"");
    parse_pattern(r, j["pattern"], s.pattern, regex);
    if (regex) r.fail("Replace decoder with a Regex pattern is not supported");
    s.content = r.str(j, "content");
  } else if (type == "ByteFallback") {
    s.kind = DecoderStep::kByteFallback;
  } else if (type == "Fuse") {
    s.kind = DecoderStep::kFuse;
  } else if (type == "Strip") {
    s.kind = DecoderStep::kStrip;
    s.content = r.str(j, "content", " ");
    s.start = static_cast<size_t>(std::max<int64_t>(0, r.integer(j, "start", 0)));
    s.stop = static_cast<size_t>(std::max<int64_t>(0, r.integer(j, "stop", 0)));
  } else if (type == "Metaspace") {
    s.kind = DecoderStep::kMetaspace;
    s.pattern = r.str(j, "replacement", "\xE2\x96\x81");
    s.scheme = parse_scheme(r, j);
  } else {
    r.fail("unsupported decoder type \"" + type + "\"");
  }
  out.push_back(std::move(s));
}

void parse_post_processor(const JsonReader& r, const json& j, PipelineTokenizer& t) {
  if (j.is_null()) return;
  const std::string type = r.str(j, "type");
  if (type == "Sequence") {
    if (!j.contains("processors") || !j["processors"].is_array())
      r.fail("post_processor Sequence needs \"processors\"");
    for (const auto& p : j["processors"]) parse_post_processor(r, p, t);
  } else if (type == "ByteLevel") {
    // Only trims offsets; adds no tokens.
  } else if (type == "TemplateProcessing") {
    if (!j.contains("single") || !j["single"].is_array())
      r.fail("TemplateProcessing needs \"single\"");
    const json specials = j.contains("special_tokens") ? j["special_tokens"] : json::object();
    t.has_template = true;
    t.template_prefix.clear();
    t.template_suffix.clear();
    bool seen_sequence = false;
    for (const auto& item : j["single"]) {
      if (item.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      if (!item.contains("SpecialToken")) r.fail("unknown TemplateProcessing item");
      const std::string name = r.str(item["SpecialToken"], "id");
      std::vector<int32_t> ids;
      if (specials.is_object() && specials.contains(name) && specials[name].contains("ids")) {
        for (const auto& id : specials[name]["ids"]) {
          const auto v = id.get<int64_t>();
          if (v < 0 || v >= t.vocab_size())
            r.fail("TemplateProcessing id " + std::to_string(v) + " is outside the vocabulary");
          ids.push_back(static_cast<int32_t>(v));
        }
      } else if (const auto id = t.token_to_id(name)) {
        ids.push_back(*id);
      } else {
        r.fail("TemplateProcessing special token \"" + name + "\" is not in the vocabulary");
      }
      auto& dst = seen_sequence ? t.template_suffix : t.template_prefix;
      dst.insert(dst.end(), ids.begin(), ids.end());
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    const auto token_id = [&](const char* key) -> int32_t {
      if (!j.contains(key) || !j[key].is_array() || j[key].size() != 2)
        r.fail(type + " needs \"" + key + "\" as [token, id]");
      const auto id = j[key][1].get<int64_t>();
      if (id < 0 || id >= t.vocab_size()) r.fail(type + " token id out of range");
      return static_cast<int32_t>(id);
    };
    t.has_template = true;
    t.template_prefix = {token_id("cls")};
    t.template_suffix = {token_id("sep")};
  } else {
    r.fail("unsupported post_processor type \"" + type + "\"");
  }
}

// bos_token / eos_token in tokenizer_config.json: a string or {"content": ...}.
std::optional<std::string> special_token_text(const json& cfg, const char* key) {
  if (!cfg.contains(key)) return std::nullopt;
  const json& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return std::nullopt;
}

void read_tokenizer_config(const std::string& path, PipelineTokenizer& t) {
  const json cfg = read_json(path);
  if (!cfg.is_object()) throw Error(path + ": expected a JSON object");
  if (cfg.contains("chat_template")) {
    const json& ct = cfg["chat_template"];
    if (ct.is_string()) {
      t.set_chat_template(ct.get<std::string>());
    } else if (ct.is_array()) {  // [{name, template}, ...]: prefer "default"
      for (const auto& e : ct) {
        if (!e.is_object() || !e.contains("template") || !e["template"].is_string()) continue;
        const bool is_default = e.contains("name") && e["name"] == "default";
        if (is_default || t.chat_template().empty()) t.set_chat_template(e["template"]);
        if (is_default) break;
      }
    }
  }
  if (const auto bos = special_token_text(cfg, "bos_token")) {
    if (const auto id = t.token_to_id(*bos)) t.set_bos(*id);
  }
  if (const auto eos = special_token_text(cfg, "eos_token")) {
    if (const auto id = t.token_to_id(*eos)) t.set_eos({*id});
  }
  if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean())
    t.set_add_bos(cfg["add_bos_token"].get<bool>());
}

// generation_config.json may list more stop ids (e.g. Llama-3 instruct's <|eot_id|>).
void read_generation_config(const std::string& path, PipelineTokenizer& t) {
  const json cfg = read_json(path);
  if (!cfg.is_object() || !cfg.contains("eos_token_id")) return;
  std::vector<int32_t> eos = t.eos_ids();
  const auto add = [&](const json& v) {
    if (!v.is_number_integer()) return;
    const auto id = v.get<int32_t>();
    if (std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(id);
  };
  const json& v = cfg["eos_token_id"];
  if (v.is_array()) {
    for (const auto& e : v) add(e);
  } else {
    add(v);
  }
  t.set_eos(std::move(eos));
}

DecoderStep decoder_step(DecoderStep::Kind kind, std::string pattern = "",
                         std::string content = "") {
  DecoderStep d{};
  d.kind = kind;
  d.pattern = std::move(pattern);
  d.content = std::move(content);
  return d;
}

std::unique_ptr<Tokenizer> load_hf_file(const std::string& path);

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_hf_file(const std::string& path) {
  try {
    return load_hf_file(path);
  } catch (const json::exception& e) {  // a value of an unexpected type somewhere
    throw Error(path + ": malformed tokenizer file: " + e.what());
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.find(path) != std::string::npos) throw;
    throw Error(path + ": " + msg);
  }
}

namespace {

std::unique_ptr<Tokenizer> load_hf_file(const std::string& path) {
  const json root = read_json(path);
  const JsonReader r(path);
  if (!root.is_object()) r.fail("expected a JSON object at the top level");
  const json& model = r.obj(root, "model");
  const std::string type = r.str(model, "type", model.contains("merges") ? "BPE" : "");
  if (type != "BPE") r.fail("unsupported tokenizer model type \"" + type + "\" (only BPE)");

  auto t = std::make_unique<PipelineTokenizer>();
  t->model_kind = tok::ModelKind::kBpe;
  const json& vocab = r.obj(model, "vocab");
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer()) r.fail("vocab id of \"" + token + "\" is not an integer");
    const auto v = id.get<int64_t>();
    if (v < 0 || v > INT32_MAX) r.fail("vocab id of \"" + token + "\" is out of range");
    t->set_token(static_cast<int32_t>(v), token);
  }
  t->byte_fallback = r.flag(model, "byte_fallback", false);
  t->fuse_unk = r.flag(model, "fuse_unk", false);
  t->ignore_merges = r.flag(model, "ignore_merges", false);
  t->continuing_subword_prefix = r.str(model, "continuing_subword_prefix");
  t->end_of_word_suffix = r.str(model, "end_of_word_suffix");
  const std::string unk = r.str(model, "unk_token");
  if (!unk.empty()) {
    const auto id = t->token_to_id(unk);
    if (!id) r.fail("unk_token \"" + unk + "\" is not in the vocabulary");
    t->unk_id = *id;
  }
  if (model.contains("merges")) {
    if (!model["merges"].is_array()) r.fail("\"merges\" must be an array");
    for (const auto& m : model["merges"]) {
      if (m.is_string()) {  // "a b"
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          r.fail("bad merge \"" + s + "\"");
        t->add_merge(s.substr(0, sp), s.substr(sp + 1), path);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        t->add_merge(m[0].get<std::string>(), m[1].get<std::string>(), path);
      } else {
        r.fail("bad merge entry " + m.dump());
      }
    }
  }
  if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
    if (!root["added_tokens"].is_array()) r.fail("\"added_tokens\" must be an array");
    for (const auto& a : root["added_tokens"]) {
      tok::AddedToken at;
      const int64_t id = r.integer(a, "id", -1);
      if (id > INT32_MAX) r.fail("added token id out of range");
      at.id = static_cast<int32_t>(id);
      at.content = r.str(a, "content");
      if (at.id < 0 || at.content.empty()) r.fail("added token needs an id and a content");
      at.special = r.flag(a, "special", false);
      at.lstrip = r.flag(a, "lstrip", false);
      at.rstrip = r.flag(a, "rstrip", false);
      at.single_word = r.flag(a, "single_word", false);
      at.normalized = r.flag(a, "normalized", !at.special);
      t->add_added_token(at);
    }
  }
  if (root.contains("normalizer")) parse_normalizer(r, root["normalizer"], t->normalizers);
  if (root.contains("pre_tokenizer"))
    parse_pre_tokenizer(r, root["pre_tokenizer"], t->pre_tokenizers);
  if (root.contains("decoder") && !root["decoder"].is_null()) {
    t->has_decoder = true;
    parse_decoder(r, root["decoder"], t->decoders);
  }
  if (root.contains("post_processor")) parse_post_processor(r, root["post_processor"], *t);
  t->finalize();

  // Defaults from the post-processor; tokenizer_config.json overrides them.
  if (!t->template_prefix.empty()) {
    t->set_bos(t->template_prefix.front());
    t->set_add_bos(true);
  }
  const auto dir = std::filesystem::path(path).parent_path();
  const auto cfg_path = dir / "tokenizer_config.json";
  if (std::filesystem::exists(cfg_path)) read_tokenizer_config(cfg_path.string(), *t);
  const auto gen_path = dir / "generation_config.json";
  if (std::filesystem::exists(gen_path)) read_generation_config(gen_path.string(), *t);
  return t;
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const GgufVocab& v) {
  const std::string where = "GGUF vocabulary";
  if (v.tokens.empty()) throw Error(where + ": no tokens");
  if (!v.scores.empty() && v.scores.size() != v.tokens.size())
    throw Error(where + ": " + std::to_string(v.scores.size()) + " scores for " +
                std::to_string(v.tokens.size()) + " tokens");
  if (!v.token_types.empty() && v.token_types.size() != v.tokens.size())
    throw Error(where + ": " + std::to_string(v.token_types.size()) + " token types for " +
                std::to_string(v.tokens.size()) + " tokens");
  const auto n = static_cast<int32_t>(v.tokens.size());
  const auto check_id = [&](int32_t id, const char* what) {
    if (id >= n) throw Error(where + ": " + what + " id " + std::to_string(id) + " out of range");
  };
  check_id(v.bos_id, "bos");
  check_id(v.eos_id, "eos");
  check_id(v.unk_id, "unk");

  auto t = std::make_unique<PipelineTokenizer>();
  for (int32_t id = 0; id < n; ++id) t->set_token(id, v.tokens[id]);
  // Control (3), unknown (2) and user-defined (4) tokens are matched in the text as a whole;
  // control and unknown ones count as special.
  for (int32_t id = 0; id < n && !v.token_types.empty(); ++id) {
    const int32_t type = v.token_types[id];
    if ((type == 2 || type == 3 || type == 4) && !v.tokens[id].empty()) {
      tok::AddedToken at;
      at.id = id;
      at.content = v.tokens[id];
      at.special = type != 4;
      t->add_added_token(at);
    }
  }
  t->unk_id = v.unk_id;
  t->has_decoder = true;
  if (v.model == "llama") {
    t->model_kind = tok::ModelKind::kSpm;
    t->set_scores(v.scores);
    const std::string space = "\xE2\x96\x81";  // ▁
    if (v.add_space_prefix)
      t->normalizers.push_back({NormalizerStep::kPrepend, space, {}, nullptr});
    t->normalizers.push_back({NormalizerStep::kReplace, " ", space, nullptr});
    t->decoders.push_back(decoder_step(DecoderStep::kReplace, space, " "));
    t->decoders.push_back(decoder_step(DecoderStep::kByteFallback));
    t->decoders.push_back(decoder_step(DecoderStep::kFuse));
    if (v.add_space_prefix) {
      auto strip = decoder_step(DecoderStep::kStrip, "", " ");
      strip.start = 1;
      t->decoders.push_back(strip);
    }
  } else if (v.model == "gpt2") {
    // Byte-level BPE. GgufVocab does not carry the pre-tokenizer name, so the Llama-3 split
    // pattern is used; models with a different pattern may tokenize slightly differently.
    t->model_kind = tok::ModelKind::kBpe;
    for (const auto& m : v.merges) {
      const size_t sp = m.find(' ');
      if (sp == std::string::npos) throw Error(where + ": bad merge \"" + m + "\"");
      t->add_merge(m.substr(0, sp), m.substr(sp + 1), where);
    }
    PreTokStep split{};
    split.kind = PreTokStep::kSplit;
    split.regex = std::make_shared<tok::Regex>(
        R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)");
    t->pre_tokenizers.push_back(split);
    PreTokStep bytes{};
    bytes.kind = PreTokStep::kByteLevel;
    t->pre_tokenizers.push_back(bytes);
    t->decoders.push_back(decoder_step(DecoderStep::kByteLevel));
  } else {
    throw Error(where + ": tokenizer model \"" + v.model + "\" is not supported");
  }
  t->finalize();
  if (v.bos_id >= 0) t->set_bos(v.bos_id);
  if (v.eos_id >= 0) t->set_eos({v.eos_id});
  t->set_add_bos(v.add_bos && v.bos_id >= 0);
  return t;
}

}  // namespace redknot
