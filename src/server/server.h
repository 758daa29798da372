// The OpenAI-compatible HTTP front end (cpp-httplib, thread pool): /v1/models,
// /v1/completions, /v1/chat/completions (streaming over SSE or not), /health and /metrics.
// HTTP threads parse and validate, tokenize, submit to the Scheduler and wait on the request's
// stream; the engine thread alone touches the model and the KV cache.
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

namespace httplib {
class Server;
}

namespace redknot::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;       // 0: any free port (printed on start)
  std::string model_id;  // the name clients must send as "model"
  std::string api_key;   // empty: no authentication
  int threads = 0;       // HTTP worker threads; 0: from max_batch
  size_t max_body_bytes = 8u << 20;
  int read_timeout_s = 5;  // slow clients that stall mid-request are dropped
  int retry_after_s = 1;   // sent with 429
  // Reported in /v1/models metadata.
  std::string backend, head_profile, chunk_store_dir, reuse_mode;
  bool batch_invariant = false;
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

  const Tokenizer& tok_;
  const ModelConfig& cfg_;
  Scheduler& sched_;
  ServerOptions opts_;
  ChatFamily family_;
  Metrics metrics_;
  std::unique_ptr<httplib::Server> http_;
};

}  // namespace redknot::server
