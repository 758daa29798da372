#include "server/server.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "server/http_front.h"

// Reported by /version.
#ifndef REDKNOT_VERSION
#define REDKNOT_VERSION "0.1.0"
#endif

namespace redknot::server {

using nlohmann::json;

namespace {

// An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status.
struct ApiError {
  int status = 400;
  std::string message, type = "invalid_request_error", param, code;
};

ApiError bad(std::string message, std::string param = {}, std::string code = {}) {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(param),
                  std::move(code)};
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json error_body(const ApiError& e) {
  json err = {{"message", e.message}, {"type", e.type}};
  err["param"] = e.param.empty() ? json() : json(e.param);
  err["code"] = e.code.empty() ? json() : json(e.code);
  return json{{"error", err}};
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(dump(error_body(e)), "application/json");
}

int64_t now_s() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Nesting deeper than this is refused before it can cost stack or memory.
constexpr int kMaxJsonDepth = 64;

json parse_body(const std::string& body) {
  json::parser_callback_t cb = [](int depth, json::parse_event_t, json&) {
    if (depth > kMaxJsonDepth) throw bad("JSON nested too deeply");
    return true;
  };
  json j;
  try {
    j = json::parse(body, cb);
  } catch (const json::exception& e) {
    throw bad(std::string("invalid JSON body: ") + e.what());
  }
  if (!j.is_object()) throw bad("the request body must be a JSON object");
  return j;
}

bool present(const json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

int64_t get_int(const json& j, const char* key, int64_t lo, int64_t hi) {
  const json& v = j[key];
  if (!v.is_number_integer()) throw bad(std::string(key) + " must be an integer", key);
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    throw bad(std::string(key) + " is out of range", key);
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi)
    throw bad(std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                  "], got " + std::to_string(x),
              key);
  return x;
}

double get_num(const json& j, const char* key, double lo, double hi) {
  const json& v = j[key];
  if (!v.is_number()) throw bad(std::string(key) + " must be a number", key);
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi))
    throw bad(
        std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]",
        key);
  return x;
}

std::string get_str(const json& v, const std::string& what) {
  if (!v.is_string()) throw bad(what + " must be a string", what);
  return v.get<std::string>();
}

bool get_bool(const json& j, const char* key, bool def) {
  if (!present(j, key)) return def;
  if (!j[key].is_boolean()) throw bad(std::string(key) + " must be a boolean", key);
  return j[key].get<bool>();
}

// One token id of field `param`: an integer in [0, vocab).
int32_t get_token_id(const json& v, const char* param, int64_t vocab) {
  if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab)
    throw bad(
        std::string(param) + " must hold token ids: integers in [0, " + std::to_string(vocab) + ")",
        param);
  return static_cast<int32_t>(v.get<int64_t>());
}

// The request surface. Every top-level field is one of: implemented (parsed below), known but
// not implemented (accepted only at its default value, otherwise a 400 naming it), or unknown (a
// 400, as OpenAI answers "Unrecognized request argument"). Types are checked for all of them.
enum class JType { kBool, kInt, kNum, kStr, kObj, kArr, kStrOrObj, kAny };

bool type_ok(const json& v, JType t) {
  switch (t) {
    case JType::kBool:
      return v.is_boolean();
    case JType::kInt:
      return v.is_number_integer();
    case JType::kNum:
      return v.is_number();
    case JType::kStr:
      return v.is_string();
    case JType::kObj:
      return v.is_object();
    case JType::kArr:
      return v.is_array();
    case JType::kStrOrObj:
      return v.is_string() || v.is_object();
    case JType::kAny:
      return true;
  }
  return false;
}

const char* type_name(JType t) {
  switch (t) {
    case JType::kBool:
      return "a boolean";
    case JType::kInt:
      return "an integer";
    case JType::kNum:
      return "a number";
    case JType::kStr:
      return "a string";
    case JType::kObj:
      return "an object";
    case JType::kArr:
      return "an array";
    case JType::kStrOrObj:
      return "a string or an object";
    case JType::kAny:
      return "a value";
  }
  return "a value";
}

struct Unimplemented {
  const char* key;
  JType type;
  // The values equal to the default (null is always accepted); empty: none.
  std::function<bool(const json&)> is_default;
  const char* what;   // the accepted value, for the message
  int endpoints = 3;  // 1: completions, 2: chat, 3: both
};

const std::vector<Unimplemented>& unimplemented() {
  auto eq = [](json d) { return [d](const json& v) { return v == d; }; };
  auto empty = [](const json& v) { return v.empty(); };
  auto none = std::function<bool(const json&)>();
  static const std::vector<Unimplemented> t = {
      {"response_format", JType::kObj, eq(json{{"type", "text"}}), "{\"type\": \"text\"}"},
      {"guided_json", JType::kStrOrObj, none, "null"},
      {"guided_regex", JType::kStr, none, "null"},
      {"guided_choice", JType::kArr, none, "null"},
      {"guided_grammar", JType::kStr, none, "null"},
      {"guided_decoding_backend", JType::kStr, none, "null"},
      {"guided_whitespace_pattern", JType::kStr, none, "null"},
      {"structured_outputs", JType::kObj, none, "null"},
      {"tools", JType::kArr, empty, "[]"},
      {"tool_choice", JType::kStrOrObj, [](const json& v) { return v == "none" || v == "auto"; },
       "\"none\" or \"auto\""},
      {"parallel_tool_calls", JType::kBool, [](const json&) { return true; }, "any"},
      {"functions", JType::kArr, empty, "[]"},
      {"function_call", JType::kStrOrObj, [](const json& v) { return v == "none" || v == "auto"; },
       "\"none\" or \"auto\""},
      {"echo", JType::kBool, eq(false), "false", 2},
      {"suffix", JType::kStr, eq(""), "\"\"", 1},
      {"min_p", JType::kNum, eq(0), "0"},
      {"use_beam_search", JType::kBool, eq(false), "false"},
      {"length_penalty", JType::kNum, eq(1), "1"},
      {"include_stop_str_in_output", JType::kBool, eq(false), "false"},
      {"skip_special_tokens", JType::kBool, eq(true), "true"},
      {"spaces_between_special_tokens", JType::kBool, eq(true), "true"},
      {"prompt_logprobs", JType::kInt, none, "null"},
      {"allowed_token_ids", JType::kArr, none, "null"},
      {"bad_words", JType::kArr, empty, "[]"},
      {"truncate_prompt_tokens", JType::kInt, none, "null"},
      {"add_generation_prompt", JType::kBool, eq(true), "true", 2},
      {"continue_final_message", JType::kBool, eq(false), "false", 2},
      {"add_special_tokens", JType::kBool, eq(false), "false", 2},
      {"add_special_tokens", JType::kBool, eq(true), "true", 1},
      {"chat_template", JType::kStr, none, "null", 2},
      {"chat_template_kwargs", JType::kObj, empty, "{}", 2},
      {"mm_processor_kwargs", JType::kObj, empty, "{}"},
      {"logits_processors", JType::kArr, empty, "[]"},
      {"priority", JType::kInt, eq(0), "0"},
      {"request_id", JType::kStr, none, "null"},
      {"modalities", JType::kArr, eq(json::array({"text"})), "[\"text\"]", 2},
      {"audio", JType::kObj, none, "null", 2},
      {"prediction", JType::kObj, none, "null", 2},
      {"reasoning_effort", JType::kStr, none, "null", 2},
      {"web_search_options", JType::kObj, none, "null", 2},
      {"service_tier", JType::kStr, [](const json& v) { return v == "auto" || v == "default"; },
       "\"auto\" or \"default\""},
      {"store", JType::kBool, eq(false), "false"},
      {"metadata", JType::kObj, empty, "{}"},
  };
  return t;
}

// Implemented fields (their values are parsed and checked where they are used).
void check_fields(const json& body, bool chat) {
  static const std::set<std::string> common = {"model",
                                               "max_tokens",
                                               "max_completion_tokens",
                                               "temperature",
                                               "top_p",
                                               "top_k",
                                               "seed",
                                               "n",
                                               "best_of",
                                               "stream",
                                               "stream_options",
                                               "stop",
                                               "stop_token_ids",
                                               "user",
                                               "logprobs",
                                               "presence_penalty",
                                               "frequency_penalty",
                                               "repetition_penalty",
                                               "logit_bias",
                                               "min_tokens",
                                               "ignore_eos",
                                               "return_tokens_as_token_ids",
                                               "reuse_mode",
                                               "kv_export",
                                               "kv_import"};
  const int ep = chat ? 2 : 1;
  for (const auto& [key, v] : body.items()) {
    if (common.count(key) ||
        (chat && (key == "messages" || key == "documents" || key == "top_logprobs")) ||
        (!chat && (key == "prompt" || key == "echo")))
      continue;
    const Unimplemented* u = nullptr;
    for (const Unimplemented& e : unimplemented())
      if (key == e.key && (e.endpoints & ep)) u = &e;
    if (!u) throw bad("unrecognized request argument: " + key, key, "unknown_parameter");
    if (v.is_null()) continue;
    if (!type_ok(v, u->type)) throw bad(key + " must be " + type_name(u->type), key);
    if (!u->is_default || !u->is_default(v))
      throw bad(key + " is not supported by this server (accepted: " + u->what + ")", key,
                "unsupported_parameter");
  }
  if (present(body, "user") && !body["user"].is_string())
    throw bad("user must be a string", "user");
}

// Sampling and length fields shared by both endpoints.
struct GenParams {
  SamplingParams sampling;
  int64_t max_tokens = -1;  // -1: endpoint default
  int32_t n = 1;
  int32_t logprobs = -1;  // top alternatives per token; -1: no logprobs
  bool echo = false, ignore_eos = false;
  bool tokens_as_ids = false;  // logprobs name tokens "token_id:<id>" (vLLM)
  std::vector<std::string> stops;
  std::vector<int32_t> stop_token_ids;
  bool stream = false, include_usage = false;
};

constexpr int64_t kMaxTokensLimit = 1 << 20;
constexpr int64_t kMaxLogprobs = 20;  // as vLLM's default max_logprobs

GenParams parse_gen(const json& j, bool chat, int64_t vocab) {
  GenParams g;
  auto flag = [&](const char* k) { return get_bool(j, k, false); };
  if (chat) {
    // Chat: logprobs is a boolean, top_logprobs the number of alternatives.
    const bool lp = flag("logprobs");
    if (present(j, "top_logprobs")) {
      const int64_t k = get_int(j, "top_logprobs", 0, kMaxLogprobs);
      if (!lp) throw bad("top_logprobs needs logprobs: true", "top_logprobs");
      g.logprobs = static_cast<int32_t>(k);
    } else if (lp) {
      g.logprobs = 0;
    }
  } else {
    if (present(j, "logprobs"))
      g.logprobs = static_cast<int32_t>(get_int(j, "logprobs", 0, kMaxLogprobs));
    g.echo = flag("echo");
    if (g.echo && g.logprobs >= 0)
      throw bad(
          "echo with logprobs needs the prompt's logprobs, which this server does not compute",
          "echo");
  }
  g.ignore_eos = flag("ignore_eos");
  g.tokens_as_ids = flag("return_tokens_as_token_ids");
  if (present(j, "presence_penalty"))
    g.sampling.presence_penalty = static_cast<float>(get_num(j, "presence_penalty", -2.0, 2.0));
  if (present(j, "frequency_penalty"))
    g.sampling.frequency_penalty = static_cast<float>(get_num(j, "frequency_penalty", -2.0, 2.0));
  if (present(j, "repetition_penalty")) {
    const double p = get_num(j, "repetition_penalty", 0.0, 10.0);
    if (!(p > 0.0)) throw bad("repetition_penalty must be in (0, 10]", "repetition_penalty");
    g.sampling.repetition_penalty = static_cast<float>(p);
  }
  if (present(j, "logit_bias")) {
    const json& b = j["logit_bias"];
    if (!b.is_object()) throw bad("logit_bias must be an object of token id -> bias", "logit_bias");
    if (b.size() > 1024) throw bad("logit_bias has more than 1024 entries", "logit_bias");
    for (const auto& [key, v] : b.items()) {
      int64_t id = -1;
      size_t used = 0;
      try {
        id = std::stoll(key, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != key.size() || id < 0 || id >= vocab)
        throw bad("logit_bias keys must be token ids in [0, " + std::to_string(vocab) + "), got '" +
                      key.substr(0, 64) + "'",
                  "logit_bias");
      if (!v.is_number() || !(v.get<double>() >= -100.0 && v.get<double>() <= 100.0))
        throw bad("logit_bias values must be numbers in [-100, 100]", "logit_bias");
      g.sampling.logit_bias.emplace_back(static_cast<int32_t>(id),
                                         static_cast<float>(v.get<double>()));
    }
  }
  if (present(j, "stop_token_ids")) {
    const json& ids = j["stop_token_ids"];
    if (!ids.is_array() || ids.size() > 1024)
      throw bad("stop_token_ids must be an array of at most 1024 token ids", "stop_token_ids");
    for (const json& v : ids) g.stop_token_ids.push_back(get_token_id(v, "stop_token_ids", vocab));
  }
  if (present(j, "max_tokens")) g.max_tokens = get_int(j, "max_tokens", 1, kMaxTokensLimit);
  if (present(j, "max_completion_tokens"))
    g.max_tokens = get_int(j, "max_completion_tokens", 1, kMaxTokensLimit);
  if (present(j, "temperature"))
    g.sampling.temperature = static_cast<float>(get_num(j, "temperature", 0.0, 2.0));
  if (present(j, "top_p")) {
    const double p = get_num(j, "top_p", 0.0, 1.0);
    if (!(p > 0.0)) throw bad("top_p must be in (0, 1]", "top_p");
    g.sampling.top_p = static_cast<float>(p);
  }
  if (present(j, "top_k")) {
    const int64_t k = get_int(j, "top_k", -1, INT32_MAX);
    g.sampling.top_k = static_cast<int32_t>(std::max<int64_t>(0, k));  // -1: off, as vLLM
  }
  if (present(j, "seed"))
    g.sampling.seed = static_cast<uint64_t>(get_int(j, "seed", INT64_MIN, INT64_MAX));
  if (present(j, "n")) g.n = static_cast<int32_t>(get_int(j, "n", 1, 128));
  if (present(j, "best_of") && get_int(j, "best_of", 1, 128) != g.n)
    throw bad("best_of other than n is not supported (no ranking of completions)", "best_of");
  if (present(j, "min_tokens")) {
    g.sampling.min_tokens = static_cast<int32_t>(get_int(j, "min_tokens", 0, kMaxTokensLimit));
    if (g.max_tokens > 0 && g.sampling.min_tokens > g.max_tokens)
      throw bad("min_tokens must be <= max_tokens", "min_tokens");
  }
  g.stream = flag("stream");
  if (present(j, "stream_options")) {
    const json& so = j["stream_options"];
    if (!so.is_object()) throw bad("stream_options must be an object", "stream_options");
    if (!g.stream) throw bad("stream_options is only allowed with stream: true", "stream_options");
    for (const auto& [k, v] : so.items()) {
      if (k != "include_usage" && k != "continuous_usage_stats")
        throw bad("stream_options." + k + " is not supported", "stream_options");
      if (!v.is_null() && !v.is_boolean())
        throw bad("stream_options." + k + " must be a boolean", "stream_options");
    }
    if (present(so, "include_usage")) g.include_usage = so["include_usage"].get<bool>();
    if (present(so, "continuous_usage_stats") && so["continuous_usage_stats"].get<bool>())
      throw bad("stream_options.continuous_usage_stats is not supported", "stream_options");
  }
  if (present(j, "stop")) {
    const json& s = j["stop"];
    if (s.is_string()) {
      g.stops.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      if (s.size() > 16) throw bad("at most 16 stop sequences", "stop");
      for (const json& e : s) g.stops.push_back(get_str(e, "stop"));
    } else {
      throw bad("stop must be a string or an array of strings", "stop");
    }
    for (const std::string& st : g.stops)
      if (st.empty() || st.size() > 1024) throw bad("stop sequences must be 1..1024 bytes", "stop");
  }
  try {
    g.sampling.validate();
  } catch (const Error& e) {
    throw bad(e.what());
  }
  return g;
}

// Turns generated ids into text, holding back what might be the start of a stop sequence and
// never cutting a UTF-8 character.
// Stop sequences count only from the min_tokens-th token on (as vLLM).
class TextState {
 public:
  TextState(const Tokenizer& tok, std::vector<std::string> stops, int32_t min_tokens = 0)
      : dec_(tok, /*skip_special=*/true), stops_(std::move(stops)), min_tokens_(min_tokens) {
    for (const auto& s : stops_) max_stop_ = std::max(max_stop_, s.size());
  }
  void push(int32_t id) {
    if (stopped_) return;
    text_ += dec_.push(id);
    if (++pushed_ >= min_tokens_)
      check();
    else
      checked_ = text_.size() + max_stop_;  // text before min_tokens holds no stop
  }
  void end() {
    if (stopped_) return;
    text_ += dec_.finish();
    check();
  }
  bool stopped() const { return stopped_; }
  const std::string& text() const { return text_; }
  // New text that is final (all of it when `final`).
  std::string take(bool final) {
    size_t limit = text_.size();
    if (!final && !stopped_ && max_stop_ > 1)
      limit = text_.size() > max_stop_ - 1 ? text_.size() - (max_stop_ - 1) : 0;
    if (limit < sent_) limit = sent_;
    while (limit > sent_ && limit < text_.size() &&
           (static_cast<unsigned char>(text_[limit]) & 0xC0) == 0x80)
      --limit;
    std::string out = text_.substr(sent_, limit - sent_);
    sent_ = limit;
    return out;
  }

 private:
  void check() {
    size_t from = checked_ > max_stop_ ? checked_ - max_stop_ : 0;
    size_t best = std::string::npos;
    for (const auto& s : stops_) best = std::min(best, text_.find(s, from));
    checked_ = text_.size();
    if (best != std::string::npos) {
      text_.resize(best);
      stopped_ = true;
    }
  }

  StreamDecoder dec_;
  std::vector<std::string> stops_;
  size_t max_stop_ = 0;
  std::string text_;
  size_t sent_ = 0, checked_ = 0;
  int32_t min_tokens_ = 0, pushed_ = 0;
  bool stopped_ = false;
};

// One completion of a request (OpenAI's choice; n of them share the prompt).
struct Choice {
  std::shared_ptr<RequestStream> rs;
  std::unique_ptr<TextState> text;
  int64_t completion_tokens = 0;
  bool over = false;
  bool opened = false, closed = false;  // streaming: its first (role, echo) and last chunk went out
  std::string finish_reason, error;
  std::vector<TokenLogprob> logprobs;  // of the tokens consumed so far
  size_t logprobs_sent = 0;            // streaming: how many went out
  size_t text_sent = 0;                // completions' text_offset: text length before them

  // Feeds a chunk from the engine; true when this completion is over.
  bool feed(const RequestStream::Chunk& c) {
    for (size_t i = 0; i < c.tokens.size(); ++i) {
      ++completion_tokens;
      if (i < c.logprobs.size()) logprobs.push_back(c.logprobs[i]);
      text->push(c.tokens[i]);
      if (text->stopped()) break;
    }
    if (text->stopped()) {
      rs->cancel();  // frees the sequence; the text is complete
      finish_reason = "stop";
      return over = true;
    }
    if (!c.finished) return false;
    text->end();
    switch (c.reason) {
      case FinishReason::kLength:
        finish_reason = "length";
        break;
      case FinishReason::kError:
        error = c.error.empty() ? "engine error" : c.error;
        break;
      default:
        finish_reason = "stop";
        break;
    }
    return over = true;
  }
};

// One request in flight: what the handler and the streaming provider share.
struct Job {
  bool chat = false, include_usage = false;
  bool log = false;       // one line on stderr when the request ends (ServerOptions::log_requests)
  int32_t logprobs = -1;  // alternatives per token; -1: none asked
  bool tokens_as_ids = false;
  const Tokenizer* tok = nullptr;
  std::string id, model, echo;  // echo: the prompt text completions put before each text
  int64_t created = 0;
  std::vector<Choice> choices;
  bool done = false;

  Job() = default;
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;
  // The request log line: whatever path ended it (answered, error, client gone), the job goes
  // with it.
  ~Job() {
    if (!log || choices.empty() || !choices[0].rs) return;
    const RequestStream& rs = *choices[0].rs;
    const ReusePath p = rs.path();
    const std::vector<double> gaps = rs.token_gaps();
    double total = 0;
    for (double g : gaps) total += g;
    std::string outcome = "cancelled";
    for (const Choice& c : choices)
      if (!c.error.empty()) outcome = "error";
    if (outcome != "error" && !choices[0].finish_reason.empty()) outcome = choices[0].finish_reason;
    std::fprintf(stderr,
                 "redknot request %s: %s n=%zu prompt=%d cached=%d completion=%lld ttft_ms=%.1f "
                 "total_ms=%.1f mode=%s->%s%s%s segments=%d hit=%d prefilled=%d uncached=%d "
                 "preemptions=%d\n",
                 id.c_str(), outcome.c_str(), choices.size(), rs.prompt_tokens(),
                 rs.cached_tokens(), static_cast<long long>(completion_tokens()),
                 gaps.empty() ? -1.0 : 1e3 * gaps[0], 1e3 * total, reuse_mode_name(p.requested),
                 reuse_mode_name(p.used),
                 p.fallback.empty() ? "" : " fallback=", p.fallback.c_str(), p.segments,
                 p.segments_hit, p.segments_prefilled, p.segments_private, rs.preemptions());
  }

  int64_t completion_tokens() const {
    int64_t n = 0;
    for (const Choice& c : choices) n += c.completion_tokens;
    return n;
  }
  bool all_over() const {
    for (const Choice& c : choices)
      if (!c.over) return false;
    return true;
  }
  std::string first_error() const {
    for (const Choice& c : choices)
      if (!c.error.empty()) return c.error;
    return {};
  }
  void cancel_all() {
    for (Choice& c : choices) c.rs->cancel();
  }

  json usage() const {
    const RequestStream& rs = *choices[0].rs;
    const int64_t p = rs.prompt_tokens();
    const int64_t done_tokens = completion_tokens();
    // RedKnot's extension: the reuse path this request took (no fallback is silent).
    const ReusePath path = rs.path();
    json reuse = {{"mode_requested", reuse_mode_name(path.requested)},
                  {"mode", reuse_mode_name(path.used)},
                  {"fallback", path.fallback.empty() ? json(nullptr) : json(path.fallback)},
                  {"segments", path.segments},
                  {"segments_hit", path.segments_hit},
                  {"segments_remote", path.segments_remote},
                  {"segments_prefilled", path.segments_prefilled},
                  {"segments_uncached", path.segments_private},
                  {"reused_tokens", path.reused_tokens},
                  {"prefix_hit_tokens", path.prefix_hit_tokens},
                  {"kv_export_bytes", path.kv_export_bytes},
                  {"kv_import_bytes", path.kv_import_bytes},
                  {"kv_token_major_bytes", path.kv_token_major_bytes},
                  {"kv_handover_error",
                   path.kv_handover_error.empty() ? json(nullptr) : json(path.kv_handover_error)},
                  {"global_head_fraction", path.global_head_fraction},
                  {"preemptions", rs.preemptions()}};
    return json{{"prompt_tokens", p},
                {"completion_tokens", done_tokens},
                {"total_tokens", p + done_tokens},
                {"prompt_tokens_details", {{"cached_tokens", rs.cached_tokens()}}},
                {"reuse", reuse}};
  }

  // A token's text as the logprobs report it (lossy for a piece of a UTF-8 character; `bytes`
  // holds the exact bytes).
  std::string token_text(int32_t id) const {
    if (tokens_as_ids) return "token_id:" + std::to_string(id);
    return tok->decode(std::span<const int32_t>(&id, 1), /*skip_special=*/false);
  }
  static json bytes_of(const std::string& s) {
    json b = json::array();
    for (unsigned char ch : s) b.push_back(static_cast<int>(ch));
    return b;
  }

  // The logprobs object for entries [from, to) of a choice: chat's {"content": [...]} or
  // completions' parallel lists. `offset`: completions' text offset of the first entry.
  json logprobs_json(const Choice& c, size_t from, size_t to, size_t& offset) const {
    if (chat) {
      json content = json::array();
      for (size_t i = from; i < to; ++i) {
        const TokenLogprob& lp = c.logprobs[i];
        const std::string t = token_text(lp.token);
        json top = json::array();
        for (const auto& [id, v] : lp.top) {
          const std::string s = token_text(id);
          top.push_back({{"token", s}, {"logprob", v}, {"bytes", bytes_of(s)}});
        }
        content.push_back(
            {{"token", t}, {"logprob", lp.logprob}, {"bytes", bytes_of(t)}, {"top_logprobs", top}});
      }
      return json{{"content", content}};
    }
    json tokens = json::array(), token_logprobs = json::array(), top = json::array(),
         offsets = json::array();
    for (size_t i = from; i < to; ++i) {
      const TokenLogprob& lp = c.logprobs[i];
      const std::string t = token_text(lp.token);
      tokens.push_back(t);
      token_logprobs.push_back(lp.logprob);
      // As vLLM: the top alternatives, and the chosen token beside them.
      json alts = json::object();
      for (const auto& [id, v] : lp.top) alts[token_text(id)] = v;
      alts[t] = lp.logprob;
      top.push_back(alts);
      offsets.push_back(offset);
      offset += t.size();
    }
    return json{{"tokens", tokens},
                {"token_logprobs", token_logprobs},
                {"top_logprobs", top},
                {"text_offset", offsets}};
  }

  json chunk(size_t index, const std::string& delta, bool with_role, const json& finish,
             const json& logprobs = nullptr) const {
    json choice = {{"index", index}, {"logprobs", logprobs}, {"finish_reason", finish}};
    if (chat) {
      json d = json::object();
      if (with_role) d["role"] = "assistant";
      if (!delta.empty() || with_role) d["content"] = delta;
      choice["delta"] = d;
    } else {
      choice["text"] = delta;
    }
    return json{{"id", id},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created},
                {"model", model},
                {"choices", json::array({choice})}};
  }

  // Streaming: the logprobs of choice i not yet sent (null when none were asked).
  json take_logprobs(Choice& c) const {
    if (logprobs < 0) return nullptr;
    size_t offset = echo.size() + c.text_sent;
    json out = logprobs_json(c, c.logprobs_sent, c.logprobs.size(), offset);
    c.text_sent = offset - echo.size();
    c.logprobs_sent = c.logprobs.size();
    return out;
  }

  json full() const {
    json list = json::array();
    for (size_t i = 0; i < choices.size(); ++i) {
      const Choice& c = choices[i];
      size_t offset = echo.size();
      json choice = {{"index", i},
                     {"logprobs", logprobs < 0 ? json(nullptr)
                                               : logprobs_json(c, 0, c.logprobs.size(), offset)},
                     {"finish_reason", c.finish_reason}};
      if (chat)
        choice["message"] = {{"role", "assistant"}, {"content", c.text->text()}};
      else
        choice["text"] = echo + c.text->text();
      list.push_back(choice);
    }
    return json{{"id", id},           {"object", chat ? "chat.completion" : "text_completion"},
                {"created", created}, {"model", model},
                {"choices", list},    {"usage", usage()}};
  }
};

std::string endpoint_label(const std::string& path) {
  for (const char* p : {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                        "/metrics", "/tokenize", "/detokenize", "/version", "/ping"})
    if (path == p) return p;
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{id}";
  return "other";
}

std::string message_content(const json& m, size_t i) {
  const std::string where = "messages[" + std::to_string(i) + "].content";
  if (!m.contains("content") || m["content"].is_null()) return "";
  const json& c = m["content"];
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) throw bad(where + " must be a string or an array of text parts", "messages");
  std::string out;
  for (const json& part : c) {
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
        !part.contains("text") || !part["text"].is_string())
      throw bad(where + ": only {\"type\": \"text\", \"text\": ...} parts are supported",
                "messages");
    out += part["text"].get<std::string>();
  }
  return out;
}

// Messages (and RedKnot's documents) of a chat request as token segments.
SegmentedPrompt chat_prompt(const Tokenizer& tok, ChatFamily family, const json& body) {
  if (!body.contains("messages") || !body["messages"].is_array() || body["messages"].empty())
    throw bad("messages must be a non-empty array", "messages");
  std::vector<ChatMessage> msgs;
  for (size_t i = 0; i < body["messages"].size(); ++i) {
    const json& m = body["messages"][i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      throw bad("messages[" + std::to_string(i) + "] needs a string role", "messages");
    const std::string role = m["role"].get<std::string>();
    if (role != "system" && role != "user" && role != "assistant" && role != "developer" &&
        role != "tool")
      throw bad("messages[" + std::to_string(i) + "].role '" + role + "' is not supported",
                "messages");
    for (const auto& [k, v] : m.items()) {
      if (k == "role" || k == "content" || v.is_null()) continue;
      if (k == "name") {
        if (!v.is_string())
          throw bad("messages[" + std::to_string(i) + "].name must be a string", "messages");
        continue;
      }
      if ((k == "tool_calls" && v.is_array() && v.empty()) || k == "tool_call_id") continue;
      throw bad("messages[" + std::to_string(i) + "]." + k + " is not supported", "messages");
    }
    msgs.push_back({role, message_content(m, i)});
  }
  std::vector<std::string> docs;
  if (present(body, "documents")) {
    if (!body["documents"].is_array())
      throw bad("documents must be an array of strings", "documents");
    for (const json& d : body["documents"]) docs.push_back(get_str(d, "documents"));
  }
  try {
    return format_chat(tok, family, msgs, docs);
  } catch (const Error& e) {
    throw bad(e.what(), "messages");  // invalid UTF-8 and the like
  }
}

// Routes and their methods (405 with Allow for the others; HEAD goes with GET).
const std::vector<std::pair<std::string, std::string>>& route_methods() {
  static const std::vector<std::pair<std::string, std::string>> r = {
      {"/health", "GET, HEAD"},         {"/metrics", "GET, HEAD"},   {"/version", "GET, HEAD"},
      {"/ping", "GET, HEAD, POST"},     {"/v1/models", "GET, HEAD"}, {"/v1/completions", "POST"},
      {"/v1/chat/completions", "POST"}, {"/tokenize", "POST"},       {"/detokenize", "POST"}};
  return r;
}

std::string allowed_methods(const std::string& path) {
  for (const auto& [p, m] : route_methods())
    if (p == path) return m;
  if (path.rfind("/v1/models/", 0) == 0 && path.size() > 11) return "GET, HEAD";
  return "";
}

}  // namespace

Server::Server(const Tokenizer& tok, const ModelConfig& cfg, Scheduler& sched, ServerOptions opts)
    : tok_(tok),
      cfg_(cfg),
      sched_(sched),
      opts_(std::move(opts)),
      family_(detect_chat_family(tok.chat_template())),
      metrics_(opts_.model_id),
      http_(std::make_unique<RoutedServer>()) {
  if (opts_.max_model_len < 0) throw Error("max_model_len must be >= 0");
  if (opts_.max_model_len > cfg_.max_position_embeddings)
    throw Error("max_model_len " + std::to_string(opts_.max_model_len) +
                " is larger than the model's context length " +
                std::to_string(cfg_.max_position_embeddings));
  HttpLimits lim;
  lim.max_body_bytes = opts_.max_body_bytes;
  if (opts_.max_bytes_in_flight < opts_.max_body_bytes)
    throw Error("the bytes in flight (" + std::to_string(opts_.max_bytes_in_flight) +
                ") must be at least one request body (" + std::to_string(opts_.max_body_bytes) +
                ")");
  lim.max_buffered_bytes = opts_.max_bytes_in_flight;
  lim.header_timeout_ms = opts_.header_timeout_ms;
  lim.request_timeout_ms = opts_.request_timeout_ms;
  lim.idle_timeout_ms = opts_.idle_timeout_ms;
  lim.max_connections = opts_.max_connections;
  // Every running and queued request may hold a worker while it waits for its tokens.
  lim.workers = opts_.threads > 0
                    ? opts_.threads
                    : std::max(64, sched_.options().max_batch + sched_.options().max_queue + 16);
  http_->set_payload_max_length(opts_.max_body_bytes);
  // What httplib announces in Keep-Alive: the reader's idle timeout; no per-connection count.
  http_->set_keep_alive_timeout(std::max(1, opts_.idle_timeout_ms / 1000));
  http_->set_keep_alive_max_count(100000);
  HttpFront::Hooks hooks;
  hooks.heavy = [](const ParsedRequest& r) {
    const std::string p = r.path();
    return r.method == "POST" && (p == "/v1/completions" || p == "/v1/chat/completions");
  };
  hooks.on_refused = [this](const std::string& path, int status) {
    metrics_.count_request(path.empty() ? "other" : endpoint_label(path), status);
  };
  front_ = std::make_unique<HttpFront>(*http_, lim, std::move(hooks));
  routes();
}

Server::~Server() = default;

int Server::bind() { return front_->bind(opts_.host, opts_.port); }
void Server::serve() { front_->serve(); }
void Server::stop() { front_->stop(); }

void Server::routes() {
  httplib::Server& s = *http_;

  // Errors httplib produces itself (unknown route, oversized body, bad request line).
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e{res.status, "bad request (HTTP " + std::to_string(res.status) + ")",
               "invalid_request_error", "", ""};
    if (res.status == 404) {
      // A known route with another method: 405 and the methods it takes.
      const std::string allow = allowed_methods(req.path);
      if (!allow.empty()) {
        res.status = 405;
        res.set_header("Allow", allow);
        e.status = 405;
        e.message =
            "method " + req.method + " is not allowed on " + req.path + " (allowed: " + allow + ")";
        e.code = "method_not_allowed";
      } else {
        e.type = "not_found_error", e.message = "no such endpoint";
      }
    }
    if (res.status == 413) e.code = "payload_too_large", e.message = "request body too large";
    send_error(res, e);
  });
  s.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown exception";
        try {
          if (ep) std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        std::cerr << "redknot serve: internal error in " << req.method << " " << req.path << ": "
                  << what << std::endl;
        send_error(res, ApiError{500, "internal error", "server_error", "", ""});
      });
  s.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    metrics_.count_request(endpoint_label(req.path), res.status);
  });

  auto authorized = [this](const httplib::Request& req) {
    if (opts_.api_key.empty()) return true;
    const std::string h = req.get_header_value("Authorization");
    const std::string want = "Bearer " + opts_.api_key;
    if (h.size() != want.size()) return false;
    unsigned diff = 0;  // constant time in the key
    for (size_t i = 0; i < h.size(); ++i) diff |= static_cast<unsigned char>(h[i] ^ want[i]);
    return diff == 0;
  };
  const ApiError unauthorized{401, "invalid or missing API key", "authentication_error", "",
                              "invalid_api_key"};

  s.Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });

  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    ChunkStoreStats cs;
    if (opts_.chunk_stats) cs = opts_.chunk_stats();
    res.set_content(metrics_.render(sched_.stats(), opts_.chunk_stats ? &cs : nullptr),
                    "text/plain; version=0.0.4");
  });

  auto model_card = [this] {
    SchedulerStats st = sched_.stats();
    json meta = {{"context_length", cfg_.max_position_embeddings},
                 {"max_model_len", max_model_len()},
                 {"vocab_size", cfg_.vocab_size},
                 {"backend", opts_.backend},
                 {"head_profile", opts_.head_profile},
                 {"chat_format", chat_family_name(family_)},
                 {"kv_pool_pages", st.pool_pages},
                 {"max_batch", sched_.options().max_batch},
                 {"batch_invariant", opts_.batch_invariant},
                 {"chunk_store_dir", opts_.chunk_store_dir},
                 {"chunk_store_redis", opts_.chunk_store_redis},
                 {"reuse_mode", opts_.reuse_mode},
                 {"chunk_reuse", opts_.chunk_stats ? "on" : "off"}};
    return json{{"id", opts_.model_id},
                {"object", "model"},
                {"created", 0},
                {"owned_by", "redknot"},
                {"root", opts_.model_id},
                {"parent", nullptr},
                {"max_model_len", max_model_len()},
                {"meta", meta}};
  };

  s.Get("/v1/models", [authorized, unauthorized, model_card](const httplib::Request& req,
                                                             httplib::Response& res) {
    if (!authorized(req)) return send_error(res, unauthorized);
    res.set_content(dump(json{{"object", "list"}, {"data", json::array({model_card()})}}),
                    "application/json");
  });
  // /v1/models/{id}: matched by prefix before routing (no std::regex over client paths; ids may
  // contain '/', as served model names like "org/name" do).
  s.set_pre_routing_handler([this, authorized, unauthorized, model_card](
                                const httplib::Request& req, httplib::Response& res) {
    // Byte ranges are never served (the reader drops Range); httplib would announce them on HEAD.
    res.set_header("Accept-Ranges", "none");
    static const std::string kPrefix = "/v1/models/";
    if (req.path.size() <= kPrefix.size() || req.path.compare(0, kPrefix.size(), kPrefix) != 0 ||
        (req.method != "GET" && req.method != "HEAD"))
      return httplib::Server::HandlerResponse::Unhandled;
    if (!authorized(req)) {
      send_error(res, unauthorized);
    } else if (const std::string id = req.path.substr(kPrefix.size()); id != opts_.model_id) {
      send_error(res, ApiError{404, "the model '" + id.substr(0, 256) + "' does not exist",
                               "not_found_error", "model", "model_not_found"});
    } else {
      res.set_content(dump(model_card()), "application/json");
    }
    return httplib::Server::HandlerResponse::Handled;
  });

  // vLLM's liveness and version routes.
  auto ping = [](const httplib::Request&, httplib::Response& res) {
    res.set_content("", "text/plain");
  };
  s.Get("/ping", ping);
  s.Post("/ping", ping);
  s.Get("/version", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(dump(json{{"version", REDKNOT_VERSION}, {"server", "redknot"}}),
                    "application/json");
  });

  // vLLM's /tokenize: {"prompt": str, "add_special_tokens": true} or {"messages": [...],
  // "documents": [...]} -> {"count", "max_model_len", "tokens", "token_strs"}.
  s.Post("/tokenize", [this, authorized, unauthorized](const httplib::Request& req,
                                                       httplib::Response& res) {
    try {
      if (!authorized(req)) throw unauthorized;
      json body = parse_body(req.body);
      const bool chat = body.contains("messages");
      for (const auto& [k, v] : body.items()) {
        static const std::set<std::string> known = {"model",
                                                    "prompt",
                                                    "messages",
                                                    "documents",
                                                    "add_special_tokens",
                                                    "add_generation_prompt",
                                                    "return_token_strs"};
        if (!known.count(k)) throw bad("unrecognized request argument: " + k, k);
      }
      if (present(body, "model") && get_str(body["model"], "model") != opts_.model_id)
        throw ApiError{404, "the model '" + body["model"].get<std::string>() + "' does not exist",
                       "not_found_error", "model", "model_not_found"};
      auto flag = [&](const char* k, bool def) { return get_bool(body, k, def); };
      std::vector<int32_t> ids;
      if (chat) {
        if (body.contains("prompt")) throw bad("give prompt or messages, not both", "prompt");
        if (!flag("add_generation_prompt", true))
          throw bad("add_generation_prompt: false is not supported", "add_generation_prompt");
        if (flag("add_special_tokens", false))
          throw bad("add_special_tokens with messages is not supported", "add_special_tokens");
        SegmentedPrompt p = chat_prompt(tok_, family_, body);
        for (const auto& sg : p.segments) ids.insert(ids.end(), sg.begin(), sg.end());
        ids.insert(ids.end(), p.query.begin(), p.query.end());
      } else {
        if (present(body, "documents")) throw bad("documents go with messages", "documents");
        if (!body.contains("prompt") || !body["prompt"].is_string())
          throw bad("prompt must be a string (or give messages)", "prompt");
        try {
          ids = tok_.encode(body["prompt"].get<std::string>(), flag("add_special_tokens", true));
        } catch (const Error& e) {
          throw bad(e.what(), "prompt");
        }
      }
      json out = {{"count", ids.size()},
                  {"max_model_len", max_model_len()},
                  {"tokens", ids},
                  {"token_strs", nullptr}};
      if (flag("return_token_strs", false)) {
        json strs = json::array();
        for (int32_t id : ids) strs.push_back(tok_.decode(std::span<const int32_t>(&id, 1)));
        out["token_strs"] = strs;
      }
      res.set_content(dump(out), "application/json");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });

  // vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}.
  s.Post("/detokenize", [this, authorized, unauthorized](const httplib::Request& req,
                                                         httplib::Response& res) {
    try {
      if (!authorized(req)) throw unauthorized;
      json body = parse_body(req.body);
      for (const auto& [k, v] : body.items())
        if (k != "model" && k != "tokens") throw bad("unrecognized request argument: " + k, k);
      if (present(body, "model") && get_str(body["model"], "model") != opts_.model_id)
        throw ApiError{404, "the model '" + body["model"].get<std::string>() + "' does not exist",
                       "not_found_error", "model", "model_not_found"};
      if (!body.contains("tokens") || !body["tokens"].is_array())
        throw bad("tokens must be an array of token ids", "tokens");
      std::vector<int32_t> ids;
      for (const json& t : body["tokens"])
        ids.push_back(get_token_id(t, "tokens", cfg_.vocab_size));
      res.set_content(dump(json{{"prompt", tok_.decode(ids)}}), "application/json");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });

  auto generate = [this, authorized, unauthorized](const httplib::Request& req,
                                                   httplib::Response& res, bool chat) {
    static std::atomic<uint64_t> next_id{1};
    try {
      if (!authorized(req)) throw unauthorized;
      json body = parse_body(req.body);
      if (present(body, "model")) {
        const std::string m = get_str(body["model"], "model");
        if (m != opts_.model_id)
          throw ApiError{404,
                         "model '" + m + "' not found; this server serves '" + opts_.model_id + "'",
                         "not_found_error", "model", "model_not_found"};
      }
      check_fields(body, chat);
      GenParams g = parse_gen(body, chat, cfg_.vocab_size);
      if (g.n > sched_.options().max_batch)
        throw bad("n = " + std::to_string(g.n) + " is more than the " +
                      std::to_string(sched_.options().max_batch) +
                      " sequences this server runs at once (--max-num-seqs)",
                  "n");

      RequestSpec spec;
      std::string echo;  // completions' echo: the prompt as text
      // RedKnot extension: a request may choose its chunk reuse mode.
      if (present(body, "reuse_mode")) {
        try {
          spec.reuse_mode = parse_reuse_mode(get_str(body["reuse_mode"], "reuse_mode"));
        } catch (const Error& e) {
          throw bad(e.what(), "reuse_mode");
        }
      }
      // RedKnot extension: prefill/decode handover of the prompt's KV through the remote store.
      for (const char* f : {"kv_export", "kv_import"}) {
        if (!present(body, f)) continue;
        const std::string h = get_str(body[f], f);
        const bool ok =
            !h.empty() && h.size() <= 128 && std::all_of(h.begin(), h.end(), [](char c) {
              return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ||
                     c == '.';
            });
        if (!ok) throw bad(std::string(f) + " must be 1-128 characters of [A-Za-z0-9._-]", f);
        if (opts_.chunk_store_redis.empty())
          throw bad(std::string(f) + " needs a remote store (serve --chunk-store-redis)", f,
                    "unsupported_parameter");
        (std::string(f) == "kv_export" ? spec.kv_export : spec.kv_import) = h;
      }
      try {
        if (chat) {
          SegmentedPrompt p = chat_prompt(tok_, family_, body);
          spec.segments = std::move(p.segments);
          spec.query = std::move(p.query);
        } else {
          if (!body.contains("prompt")) throw bad("prompt is required", "prompt");
          json prompt = body["prompt"];
          if (prompt.is_array() && prompt.size() == 1 && prompt[0].is_string()) prompt = prompt[0];
          if (prompt.is_string()) {
            spec.query = tok_.encode(prompt.get<std::string>(), /*add_special=*/true);
            if (g.echo) echo = prompt.get<std::string>();
          } else if (prompt.is_array() && !prompt.empty()) {
            for (const json& t : prompt)
              spec.query.push_back(get_token_id(t, "prompt", cfg_.vocab_size));
          } else {
            throw bad("prompt must be a string or a non-empty array of token ids", "prompt");
          }
          if (g.echo && echo.empty()) echo = tok_.decode(spec.query, /*skip_special=*/true);
        }
      } catch (const Error& e) {
        throw bad(e.what());  // tokenizer: invalid UTF-8 and the like
      }

      int64_t prompt_len = 0;
      for (const auto& sg : spec.segments) prompt_len += static_cast<int64_t>(sg.size());
      prompt_len += static_cast<int64_t>(spec.query.size());
      if (prompt_len == 0) throw bad("the prompt is empty", chat ? "messages" : "prompt");
      const int64_t ctx = max_model_len();
      if (prompt_len >= ctx)
        throw bad("the prompt has " + std::to_string(prompt_len) +
                      " tokens; this model's maximum context length is " + std::to_string(ctx),
                  chat ? "messages" : "prompt", "context_length_exceeded");
      // As vLLM: an explicit max_tokens that does not fit is an error, not silently shortened.
      if (g.max_tokens > 0 && prompt_len + g.max_tokens > ctx)
        throw bad("this model's maximum context length is " + std::to_string(ctx) +
                      " tokens; the request asks for " + std::to_string(prompt_len + g.max_tokens) +
                      " (" + std::to_string(prompt_len) + " in the prompt, " +
                      std::to_string(g.max_tokens) + " to generate)",
                  "max_tokens", "context_length_exceeded");
      int64_t max_tokens = g.max_tokens > 0 ? g.max_tokens : (chat ? ctx - prompt_len : 16);
      max_tokens = std::min(max_tokens, ctx - prompt_len);
      if (g.sampling.min_tokens > max_tokens)
        throw bad("min_tokens (" + std::to_string(g.sampling.min_tokens) +
                      ") is more than the tokens this request may generate (" +
                      std::to_string(max_tokens) + ")",
                  "min_tokens");
      spec.max_tokens = static_cast<int32_t>(max_tokens);
      spec.sampling = g.sampling;
      spec.logprobs = g.logprobs;
      // Generation stops at the model's end-of-sequence tokens (unless ignore_eos) and at the
      // request's stop_token_ids; min_tokens holds all of them back.
      if (!g.ignore_eos) {
        spec.stop_ids = tok_.eos_ids();
        for (int32_t e : cfg_.eos_token_ids) spec.stop_ids.push_back(e);
      }
      spec.stop_ids.insert(spec.stop_ids.end(), g.stop_token_ids.begin(), g.stop_token_ids.end());
      std::sort(spec.stop_ids.begin(), spec.stop_ids.end());
      spec.stop_ids.erase(std::unique(spec.stop_ids.begin(), spec.stop_ids.end()),
                          spec.stop_ids.end());

      auto job = std::make_shared<Job>();
      job->chat = chat;
      job->include_usage = g.include_usage;
      job->id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id.fetch_add(1));
      job->log = opts_.log_requests;
      job->model = opts_.model_id;
      job->created = now_s();
      job->tok = &tok_;
      job->logprobs = g.logprobs;
      job->tokens_as_ids = g.tokens_as_ids;
      job->echo = echo;
      try {
        for (auto& rs : sched_.submit_n(std::move(spec), g.n)) {
          Choice c;
          c.rs = std::move(rs);
          c.text = std::make_unique<TextState>(tok_, g.stops, g.sampling.min_tokens);
          job->choices.push_back(std::move(c));
        }
      } catch (const QueueFull& e) {
        res.set_header("Retry-After", std::to_string(opts_.retry_after_s));
        throw ApiError{429, e.what(), "rate_limit_error", "", "rate_limit_exceeded"};
      } catch (const Error& e) {
        throw bad(e.what());
      }

      // Drains what the engine produced; waits up to `wait` when nothing was there. True when
      // something arrived or ended.
      auto pump = [](Job& j, std::chrono::milliseconds wait) {
        bool news = false;
        for (Choice& c : j.choices) {
          if (c.over) continue;
          RequestStream::Chunk ch = c.rs->wait(std::chrono::milliseconds(0));
          news |= !ch.tokens.empty() || ch.finished;
          c.feed(ch);
        }
        if (news || j.all_over()) return true;
        for (Choice& c : j.choices)
          if (!c.over) {
            RequestStream::Chunk ch = c.rs->wait(wait);
            c.feed(ch);
            return !ch.tokens.empty() || ch.finished;
          }
        return true;
      };
      if (!g.stream) {
        while (!job->all_over()) {
          pump(*job, std::chrono::milliseconds(100));
          if (!job->all_over() && client_disconnected()) {  // nobody to answer: free it now
            job->cancel_all();
            res.status = 499;  // nginx's "client closed request", for /metrics
            return;
          }
        }
        for (const Choice& c : job->choices) metrics_.observe_token_gaps(c.rs->token_gaps());
        if (const std::string e = job->first_error(); !e.empty())
          throw ApiError{500, e, "server_error", "", ""};
        res.set_content(dump(job->full()), "application/json");
        return;
      }

      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream",
          [this, job, pump](size_t, httplib::DataSink& sink) {
            auto send = [&](const json& j) {
              const std::string line = "data: " + dump(j) + "\n\n";
              return sink.write(line.data(), line.size());
            };
            // Each choice opens with the assistant role (chat) or the echoed prompt.
            for (size_t i = 0; i < job->choices.size(); ++i) {
              Choice& c = job->choices[i];
              if (c.opened) continue;
              c.opened = true;
              if ((job->chat || !job->echo.empty()) &&
                  !send(job->chunk(i, job->echo, job->chat, nullptr)))
                return job->cancel_all(), false;
            }
            pump(*job, std::chrono::milliseconds(100));
            for (size_t i = 0; i < job->choices.size(); ++i) {
              Choice& c = job->choices[i];
              if (c.closed) continue;
              const std::string delta = c.text->take(c.over);
              const bool ending = c.over && c.error.empty();
              // A choice's tokens' logprobs go with the text that shows them, the rest with its
              // last chunk.
              if (!delta.empty() || (ending && c.logprobs_sent < c.logprobs.size())) {
                const json lp = job->take_logprobs(c);
                if (!send(job->chunk(i, delta, false, nullptr, lp)))
                  return job->cancel_all(), false;  // client gone: free its pages now
              }
              if (ending) {
                if (!send(job->chunk(i, "", false, c.finish_reason)))
                  return job->cancel_all(), false;
                c.closed = true;
              }
            }
            if (!job->all_over()) {
              if (!sink.is_writable()) return job->cancel_all(), false;
              return true;
            }
            job->done = true;
            for (const Choice& c : job->choices) metrics_.observe_token_gaps(c.rs->token_gaps());
            if (const std::string e = job->first_error(); !e.empty()) {
              send(error_body(ApiError{500, e, "server_error", "", ""}));
            } else {
              if (job->include_usage) {
                json u = job->chunk(0, "", false, nullptr);
                u["choices"] = json::array();
                u["usage"] = job->usage();
                send(u);
              }
            }
            static const std::string kDone = "data: [DONE]\n\n";
            sink.write(kDone.data(), kDone.size());
            sink.done();
            return true;
          },
          [job](bool) {
            if (!job->done) job->cancel_all();  // connection closed mid-stream
          });
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const std::exception& e) {
      std::cerr << "redknot serve: internal error in " << req.method << " " << req.path << ": "
                << e.what() << std::endl;
      send_error(res,
                 ApiError{500, std::string("internal error: ") + e.what(), "server_error", "", ""});
    }
  };

  s.Post("/v1/completions", [generate](const httplib::Request& req, httplib::Response& res) {
    generate(req, res, false);
  });
  s.Post("/v1/chat/completions", [generate](const httplib::Request& req, httplib::Response& res) {
    generate(req, res, true);
  });
}

}  // namespace redknot::server
