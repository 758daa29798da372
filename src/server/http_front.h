// The HTTP/1.1 front end of the server: an event-driven reader in front of cpp-httplib's router.
//
// cpp-httplib (Debian 12: 0.11.4) gives every connection a worker thread for its whole life and
// bounds reads only per recv(), so a few hundred clients sending a byte at a time hold every
// worker; it also buffers chunked and gzip request bodies without the size limit, accepts any
// number of headers and conflicting Content-Length headers, and honours Range. Here one reactor
// thread (epoll) accepts connections and reads each request with deadlines and limits; only a
// complete, validated request reaches a worker, which runs httplib's router over the buffered
// bytes (Server::process_request on a Stream) and writes the response to the socket. See
// docs/http.md for the policy and the reasons.
#pragma once

#include <httplib.h>

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace redknot::server {

struct HttpLimits {
  size_t max_body_bytes = 8u << 20;     // after de-chunking; larger: 413
  size_t max_header_bytes = 16u << 10;  // request line + headers (and trailers); larger: 431
  size_t max_headers = 100;             // header fields; more: 431
  size_t max_target_bytes = 8192;       // request target; longer: 414
  int header_timeout_ms = 10000;        // first byte of a request -> end of its head; then 408
  int request_timeout_ms = 30000;       // first byte of a request -> end of its body; then 408
  int idle_timeout_ms = 5000;           // a connection without a request in progress is closed
  int write_timeout_ms = 30000;         // a response write that makes no progress this long fails
  int max_connections = 4096;           // open connections; at the cap the oldest waiting one goes
  size_t max_buffered_bytes = 512u << 20;  // unfinished requests' bytes, all connections; then 503
  int workers = 64;                        // threads for "heavy" requests (generation)
  int light_workers = 4;                   // threads for everything else (/health, /metrics ...)
};

// One request as read off the wire, validated and re-framed: `wire` is its canonical form for
// httplib (request line, the headers minus framing/Range/Expect, Content-Length, the body).
struct ParsedRequest {
  std::string method, target, version;
  std::string wire;
  size_t body_bytes = 0;
  bool keep_alive = true;
  std::string path() const { return target.substr(0, target.find('?')); }
};

// Incremental request reader of one connection (no I/O). Feed bytes with append() and call
// parse(); on kComplete take() the request (the bytes after it stay for the next one, so
// pipelined requests are answered in order).
class RequestParser {
 public:
  enum class State { kNeedMore, kComplete, kError };

  explicit RequestParser(const HttpLimits& lim) : lim_(lim) {}

  void append(const char* p, size_t n) { in_.append(p, n); }
  State parse();
  ParsedRequest take();

  // Bytes of a request have arrived (a request is in progress).
  bool started() const { return phase_ != Phase::kHead || in_.find_first_not_of("\r\n") != npos; }
  bool head_done() const { return phase_ != Phase::kHead; }
  // True once, when the head asked for "100 Continue" and its body is still to come.
  bool take_continue();
  // Memory the unfinished request holds: its unparsed input, and the body's allocation (not
  // only what is used: a body grows in steps up to the limit).
  size_t buffered() const { return in_.size() + body_.capacity() + head_.size(); }
  int error_status() const { return err_status_; }
  const std::string& error_message() const { return err_msg_; }

 private:
  static constexpr size_t npos = std::string::npos;
  enum class Phase { kHead, kLength, kChunkSize, kChunkData, kChunkEnd, kTrailer, kDone, kError };
  State fail(int status, std::string msg);
  State parse_step();
  State parse_head(size_t end);
  State parse_chunked();

  HttpLimits lim_;
  std::string in_;  // unconsumed input
  size_t scanned_ = 0;
  Phase phase_ = Phase::kHead;
  ParsedRequest req_;
  std::string head_;  // canonical head lines without Content-Length
  std::string body_;
  uint64_t left_ = 0;  // body or chunk bytes still to come
  size_t trailer_bytes_ = 0;
  bool expect_continue_ = false;
  int err_status_ = 0;
  std::string err_msg_;
};

// An OpenAI-shaped error response with Connection: close (the front's own refusals).
std::string error_response(int status, const std::string& message, const std::string& code = {});

// From a request handler: whether the client of the request this thread serves has gone (reset,
// closed, or half-closed its side), or the server is stopping. Polls the socket; cheap.
bool client_disconnected();

// httplib's router, driven from HttpFront's workers.
class RoutedServer : public httplib::Server {
 public:
  bool handle(httplib::Stream& strm, bool close_connection, bool& connection_closed) {
    return process_request(strm, close_connection, connection_closed, nullptr);
  }
  // httplib stops chunked responses when its listening socket is invalid: mark it live/dead.
  void set_live(bool live) { svr_sock_ = live ? 0 : INVALID_SOCKET; }
};

class HttpFront {
 public:
  struct Hooks {
    // Heavy requests (generation) run on the `workers` pool, the rest on the light pool, so that
    // /health and /metrics answer while every generation worker is busy.
    std::function<bool(const ParsedRequest&)> heavy;
    // Called for every request the front refuses itself (path may be empty).
    std::function<void(const std::string& path, int status)> on_refused;
  };

  HttpFront(RoutedServer& routes, HttpLimits lim, Hooks hooks);
  ~HttpFront();

  // Binds and listens (port 0: any free one); returns the bound port or throws.
  int bind(const std::string& host, int port);
  // Runs until stop(); in-flight requests finish (handlers see client_disconnected()).
  void serve();
  // Async-signal-safe.
  void stop();

  size_t open_connections() const { return open_.load(); }

 private:
  struct Conn;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::atomic<size_t> open_{0};
};

}  // namespace redknot::server
