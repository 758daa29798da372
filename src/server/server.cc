#include "server/server.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/error.h"

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
  if (present(j, "stream")) {
    if (!j["stream"].is_boolean()) throw bad("stream must be a boolean", "stream");
    g.stream = j["stream"].get<bool>();
  }
  if (present(j, "stream_options")) {
    const json& so = j["stream_options"];
    if (!so.is_object()) throw bad("stream_options must be an object", "stream_options");
    if (present(so, "include_usage")) {
      if (!so["include_usage"].is_boolean())
        throw bad("stream_options.include_usage must be a boolean", "stream_options");
      g.include_usage = so["include_usage"].get<bool>();
    }
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
  std::string id, model;
  int64_t created = 0;
  std::shared_ptr<RequestStream> rs;
  std::unique_ptr<TextState> text;
  int64_t completion_tokens = 0;
  bool done = false, role_sent = false;
  std::string finish_reason, error;

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
  for (const char* p :
       {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})
    if (path == p) return p;
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

}  // namespace

Server::Server(const Tokenizer& tok, const ModelConfig& cfg, Scheduler& sched, ServerOptions opts)
    : tok_(tok),
      cfg_(cfg),
      sched_(sched),
      opts_(std::move(opts)),
      family_(detect_chat_family(tok.chat_template())),
      http_(std::make_unique<httplib::Server>()) {
  const int threads =
      opts_.threads > 0 ? opts_.threads : std::max(64, 4 * sched_.options().max_batch + 16);
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http_->set_payload_max_length(opts_.max_body_bytes);
  http_->set_read_timeout(opts_.read_timeout_s, 0);
  http_->set_write_timeout(30, 0);
  http_->set_keep_alive_timeout(2);
  http_->set_keep_alive_max_count(1000);
  routes();
}

Server::~Server() = default;

int Server::bind() {
  int port = opts_.port;
  if (port == 0) {
    port = http_->bind_to_any_port(opts_.host);
  } else if (!http_->bind_to_port(opts_.host, port)) {
    port = -1;
  }
  if (port <= 0) throw Error("cannot listen on " + opts_.host + ":" + std::to_string(opts_.port));
  return port;
}

void Server::serve() { http_->listen_after_bind(); }
void Server::stop() { http_->stop(); }

void Server::routes() {
  httplib::Server& s = *http_;

  // Errors httplib produces itself (unknown route, oversized body, bad request line).
  s.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e{res.status, "bad request (HTTP " + std::to_string(res.status) + ")",
               "invalid_request_error", "", ""};
    if (res.status == 404) e.type = "not_found_error", e.message = "no such endpoint";
    if (res.status == 413) e.code = "payload_too_large", e.message = "request body too large";
    send_error(res, e);
  });
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
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

  s.Get("/v1/models",
        [this, authorized, unauthorized](const httplib::Request& req, httplib::Response& res) {
          if (!authorized(req)) return send_error(res, unauthorized);
          SchedulerStats st = sched_.stats();
          json meta = {{"context_length", cfg_.max_position_embeddings},
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
          json model = {{"id", opts_.model_id},
                        {"object", "model"},
                        {"created", 0},
                        {"owned_by", "redknot"},
                        {"meta", meta}};
          res.set_content(dump(json{{"object", "list"}, {"data", json::array({model})}}),
                          "application/json");
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
          if (!body.contains("messages") || !body["messages"].is_array() ||
              body["messages"].empty())
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
            msgs.push_back({role, message_content(m, i)});
          }
          std::vector<std::string> docs;
          if (present(body, "documents")) {
            if (!body["documents"].is_array())
              throw bad("documents must be an array of strings", "documents");
            for (const json& d : body["documents"]) docs.push_back(get_str(d, "documents"));
          }
          SegmentedPrompt p = format_chat(tok_, family_, msgs, docs);
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
      const int64_t ctx = cfg_.max_position_embeddings;
      if (prompt_len >= ctx)
        throw bad("the prompt has " + std::to_string(prompt_len) +
                      " tokens; this model's context length is " + std::to_string(ctx),
                  chat ? "messages" : "prompt", "context_length_exceeded");
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
        while (!job->feed(job->rs->wait(std::chrono::milliseconds(200)))) {
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
