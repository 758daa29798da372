#include "server/server.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
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
      {"logprobs", JType::kBool, eq(false), "false", 2},
      {"logprobs", JType::kInt, none, "null", 1},
      {"top_logprobs", JType::kInt, eq(0), "0"},
      {"presence_penalty", JType::kNum, eq(0), "0"},
      {"frequency_penalty", JType::kNum, eq(0), "0"},
      {"repetition_penalty", JType::kNum, eq(1), "1"},
      {"logit_bias", JType::kObj, empty, "{}"},
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
      {"echo", JType::kBool, eq(false), "false"},
      {"suffix", JType::kStr, eq(""), "\"\"", 1},
      {"min_tokens", JType::kInt, eq(0), "0"},
      {"ignore_eos", JType::kBool, eq(false), "false"},
      {"min_p", JType::kNum, eq(0), "0"},
      {"use_beam_search", JType::kBool, eq(false), "false"},
      {"length_penalty", JType::kNum, eq(1), "1"},
      {"stop_token_ids", JType::kArr, empty, "[]"},
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
      {"return_tokens_as_token_ids", JType::kBool, eq(false), "false"},
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
                                               "user",
                                               "reuse_mode"};
  const int ep = chat ? 2 : 1;
  for (const auto& [key, v] : body.items()) {
    if (common.count(key) || (chat && (key == "messages" || key == "documents")) ||
        (!chat && key == "prompt"))
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
  std::vector<std::string> stops;
  bool stream = false, include_usage = false;
};

constexpr int64_t kMaxTokensLimit = 1 << 20;

GenParams parse_gen(const json& j) {
  GenParams g;
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
  if (present(j, "n") && get_int(j, "n", 1, 128) != 1) throw bad("only n = 1 is supported", "n");
  if (present(j, "best_of") && get_int(j, "best_of", 1, 128) != 1)
    throw bad("best_of is not supported (only best_of = 1)", "best_of");
  if (present(j, "stream")) {
    if (!j["stream"].is_boolean()) throw bad("stream must be a boolean", "stream");
    g.stream = j["stream"].get<bool>();
  }
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
class TextState {
 public:
  TextState(const Tokenizer& tok, std::vector<std::string> stops)
      : dec_(tok, /*skip_special=*/true), stops_(std::move(stops)) {
    for (const auto& s : stops_) max_stop_ = std::max(max_stop_, s.size());
  }
  void push(int32_t id) {
    if (stopped_) return;
    text_ += dec_.push(id);
    check();
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
  bool stopped_ = false;
};

// One request in flight: what the handler and the streaming provider share.
struct Job {
  bool chat = false, include_usage = false;
  bool log = false;  // one line on stderr when the request ends (ServerOptions::log_requests)
  std::string id, model;
  int64_t created = 0;
  std::shared_ptr<RequestStream> rs;
  std::unique_ptr<TextState> text;
  int64_t completion_tokens = 0;
  bool done = false, role_sent = false;
  std::string finish_reason, error;

  Job() = default;
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;
  // The request log line: whatever path ended it (answered, error, client gone), the job goes
  // with it.
  ~Job() {
    if (!log || !rs) return;
    const ReusePath p = rs->path();
    const std::vector<double> gaps = rs->token_gaps();
    double total = 0;
    for (double g : gaps) total += g;
    const std::string outcome = !error.empty()           ? "error"
                                : !finish_reason.empty() ? finish_reason
                                                         : "cancelled";
    std::fprintf(stderr,
                 "redknot request %s: %s prompt=%d cached=%d completion=%lld ttft_ms=%.1f "
                 "total_ms=%.1f mode=%s->%s%s%s segments=%d hit=%d prefilled=%d uncached=%d "
                 "preemptions=%d\n",
                 id.c_str(), outcome.c_str(), rs->prompt_tokens(), rs->cached_tokens(),
                 static_cast<long long>(completion_tokens), gaps.empty() ? -1.0 : 1e3 * gaps[0],
                 1e3 * total, reuse_mode_name(p.requested), reuse_mode_name(p.used),
                 p.fallback.empty() ? "" : " fallback=", p.fallback.c_str(), p.segments,
                 p.segments_hit, p.segments_prefilled, p.segments_private, rs->preemptions());
  }

  // Feeds a chunk from the engine; true when the request is over.
  bool feed(const RequestStream::Chunk& c) {
    for (int32_t t : c.tokens) {
      ++completion_tokens;
      text->push(t);
      if (text->stopped()) break;
    }
    if (text->stopped()) {
      rs->cancel();  // frees the sequence; the text is complete
      finish_reason = "stop";
      return true;
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
    return true;
  }

  json usage() const {
    const int64_t p = rs->prompt_tokens();
    // RedKnot's extension: the reuse path this request took (no fallback is silent).
    const ReusePath path = rs->path();
    json reuse = {{"mode_requested", reuse_mode_name(path.requested)},
                  {"mode", reuse_mode_name(path.used)},
                  {"fallback", path.fallback.empty() ? json(nullptr) : json(path.fallback)},
                  {"segments", path.segments},
                  {"segments_hit", path.segments_hit},
                  {"segments_prefilled", path.segments_prefilled},
                  {"segments_uncached", path.segments_private},
                  {"reused_tokens", path.reused_tokens},
                  {"prefix_hit_tokens", path.prefix_hit_tokens},
                  {"preemptions", rs->preemptions()}};
    return json{{"prompt_tokens", p},
                {"completion_tokens", completion_tokens},
                {"total_tokens", p + completion_tokens},
                {"prompt_tokens_details", {{"cached_tokens", rs->cached_tokens()}}},
                {"reuse", reuse}};
  }

  json chunk(const std::string& delta, bool with_role, const json& finish) const {
    json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish}};
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

  json full() const {
    json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
    if (chat)
      choice["message"] = {{"role", "assistant"}, {"content", text->text()}};
    else
      choice["text"] = text->text();
    return json{{"id", id},
                {"object", chat ? "chat.completion" : "text_completion"},
                {"created", created},
                {"model", model},
                {"choices", json::array({choice})},
                {"usage", usage()}};
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
      auto flag = [&](const char* k, bool def) {
        if (!present(body, k)) return def;
        if (!body[k].is_boolean()) throw bad(std::string(k) + " must be a boolean", k);
        return body[k].get<bool>();
      };
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
      for (const json& t : body["tokens"]) {
        if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= cfg_.vocab_size)
          throw bad("tokens must be integers in [0, " + std::to_string(cfg_.vocab_size) + ")",
                    "tokens");
        ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
      }
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
      GenParams g = parse_gen(body);

      RequestSpec spec;
      // RedKnot extension: a request may choose its chunk reuse mode.
      if (present(body, "reuse_mode")) {
        try {
          spec.reuse_mode = parse_reuse_mode(get_str(body["reuse_mode"], "reuse_mode"));
        } catch (const Error& e) {
          throw bad(e.what(), "reuse_mode");
        }
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
          } else if (prompt.is_array() && !prompt.empty()) {
            for (const json& t : prompt) {
              if (!t.is_number_integer() || t.get<int64_t>() < 0 ||
                  t.get<int64_t>() >= cfg_.vocab_size)
                throw bad("prompt token ids must be integers in [0, " +
                              std::to_string(cfg_.vocab_size) + ")",
                          "prompt");
              spec.query.push_back(static_cast<int32_t>(t.get<int64_t>()));
            }
          } else {
            throw bad("prompt must be a string or a non-empty array of token ids", "prompt");
          }
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
      spec.max_tokens = static_cast<int32_t>(max_tokens);
      spec.sampling = g.sampling;
      spec.stop_ids = tok_.eos_ids();
      for (int32_t e : cfg_.eos_token_ids)
        if (std::find(spec.stop_ids.begin(), spec.stop_ids.end(), e) == spec.stop_ids.end())
          spec.stop_ids.push_back(e);

      auto job = std::make_shared<Job>();
      job->chat = chat;
      job->include_usage = g.include_usage;
      job->id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id.fetch_add(1));
      job->log = opts_.log_requests;
      job->model = opts_.model_id;
      job->created = now_s();
      job->text = std::make_unique<TextState>(tok_, g.stops);
      try {
        job->rs = sched_.submit(std::move(spec));
      } catch (const QueueFull& e) {
        res.set_header("Retry-After", std::to_string(opts_.retry_after_s));
        throw ApiError{429, e.what(), "rate_limit_error", "", "rate_limit_exceeded"};
      } catch (const Error& e) {
        throw bad(e.what());
      }

      if (!g.stream) {
        while (!job->feed(job->rs->wait(std::chrono::milliseconds(100)))) {
          if (client_disconnected()) {  // nobody to answer: free the sequence now
            job->rs->cancel();
            res.status = 499;  // nginx's "client closed request", for /metrics
            return;
          }
        }
        metrics_.observe_token_gaps(job->rs->token_gaps());
        if (!job->error.empty()) throw ApiError{500, job->error, "server_error", "", ""};
        res.set_content(dump(job->full()), "application/json");
        return;
      }

      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream",
          [this, job](size_t, httplib::DataSink& sink) {
            auto send = [&](const json& j) {
              const std::string line = "data: " + dump(j) + "\n\n";
              return sink.write(line.data(), line.size());
            };
            if (job->chat && !job->role_sent) {
              job->role_sent = true;
              if (!send(job->chunk("", true, nullptr))) return job->rs->cancel(), false;
            }
            const bool over = job->feed(job->rs->wait(std::chrono::milliseconds(100)));
            const std::string delta = job->text->take(over);
            if (!delta.empty() && !send(job->chunk(delta, false, nullptr)))
              return job->rs->cancel(), false;  // client gone: free its pages now
            if (!over) {
              if (!sink.is_writable()) return job->rs->cancel(), false;
              return true;
            }
            job->done = true;
            metrics_.observe_token_gaps(job->rs->token_gaps());
            if (!job->error.empty()) {
              send(error_body(ApiError{500, job->error, "server_error", "", ""}));
            } else {
              send(job->chunk("", false, job->finish_reason));
              if (job->include_usage) {
                json u = job->chunk("", false, nullptr);
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
            if (!job->done) job->rs->cancel();  // connection closed mid-stream
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
