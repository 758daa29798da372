// The OpenAI-compatible HTTP API: /v1/models[/{id}], /v1/completions, /v1/chat/completions
// (streaming over SSE or not), the vLLM-compatible /tokenize, /detokenize, /version, /ping, and
// /health, /metrics. Requests are read by HttpFront (http_front.h: deadlines, limits, an epoll
// reader) and routed by cpp-httplib on worker threads, which parse and validate, tokenize, submit
// to the Scheduler and wait on the request's stream; the engine thread alone touches the model
// and the KV cache. docs/http.md: the HTTP policy and the parameter surface.
#pragma once
#include <functional>

#include <cstdint>
#include <memory>
#include <string>
#include "reuse/chunk_store.h"

#include "engine/scheduler.h"
#include "server/chat_format.h"
#include "server/metrics.h"
#include "tokenizer/tokenizer.h"

namespace redknot::server {

class RoutedServer;
class HttpFront;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;       // 0: any free port (printed on start)
  std::string model_id;  // the name clients must send as "model"
  std::string api_key;   // empty: no authentication
  int threads = 0;       // HTTP worker threads for generation; 0: from max_batch
  size_t max_body_bytes = 8u << 20;
  size_t max_bytes_in_flight = 512u << 20;  // unfinished requests' bytes, all connections
  int header_timeout_ms = 10000;   // a request's head must arrive within this of its first byte
  int request_timeout_ms = 30000;  // and its body within this
  int idle_timeout_ms = 5000;      // keep-alive connections idle this long are closed
  int max_connections = 4096;      // open connections at most (the oldest waiting one makes room)
  int64_t max_model_len = 0;       // prompt + max_tokens at most; 0: the model's context length
  int retry_after_s = 1;           // sent with 429
  // Reported in /v1/models metadata.
  std::string backend, head_profile, chunk_store_dir, chunk_store_redis, reuse_mode;
  bool batch_invariant = false;
  bool log_requests = true;  // one stderr line per finished request, with its reuse path
  // The chunk store's counters for /metrics (null: no chunk store).
  std::function<ChunkStoreStats()> chunk_stats;
};

class Server {
 public:
  Server(const Tokenizer& tok, const ModelConfig& cfg, Scheduler& sched, ServerOptions opts);
  ~Server();

  // Binds (port 0: a free one) and returns the bound port; throws Error when it cannot.
  int bind();
  // Serves until stop() (blocking).
  void serve();
  void stop();

  Metrics& metrics() { return metrics_; }

 private:
  void routes();
  int64_t max_model_len() const {
    return opts_.max_model_len > 0 ? opts_.max_model_len : cfg_.max_position_embeddings;
  }

  const Tokenizer& tok_;
  const ModelConfig& cfg_;
  Scheduler& sched_;
  ServerOptions opts_;
  ChatFamily family_;
  Metrics metrics_;
  std::unique_ptr<RoutedServer> http_;
  std::unique_ptr<HttpFront> front_;
};

}  // namespace redknot::server
