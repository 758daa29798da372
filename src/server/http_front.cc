#include "server/http_front.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>

#include "core/error.h"

namespace redknot::server {

namespace {

using Clock = std::chrono::steady_clock;

std::string lower(std::string_view s) {
  std::string o(s);
  for (char& c : o) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return o;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool is_tchar(char c) {
  if (std::isalnum(static_cast<unsigned char>(c))) return true;
  return std::strchr("!#$%&'*+-.^_`|~", c) != nullptr && c != '\0';
}

// Comma-separated tokens of a header value, lower-cased.
std::vector<std::string> tokens(std::string_view v) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= v.size()) {
    size_t j = v.find(',', i);
    if (j == std::string_view::npos) j = v.size();
    std::string_view t = trim(v.substr(i, j - i));
    if (!t.empty()) out.push_back(lower(t));
    i = j + 1;
  }
  return out;
}

const char* reason(int status) {
  switch (status) {
    case 400:
      return "Bad Request";
    case 408:
      return "Request Timeout";
    case 411:
      return "Length Required";
    case 413:
      return "Payload Too Large";
    case 414:
      return "URI Too Long";
    case 415:
      return "Unsupported Media Type";
    case 417:
      return "Expectation Failed";
    case 431:
      return "Request Header Fields Too Large";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Error";
  }
}

thread_local int tl_fd = -1;
thread_local const std::atomic<bool>* tl_stopping = nullptr;

bool peer_gone(int fd) {
  if (fd < 0) return true;
  pollfd p{fd, static_cast<short>(POLLIN | POLLRDHUP), 0};
  if (::poll(&p, 1, 0) < 0) return false;
  if (p.revents & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char c;
    const ssize_t n = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return true;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return true;
  }
  return false;
}

// A worker's view of one request: reads come from the buffered request, writes go to the socket
// (non-blocking, each waiting at most the write timeout for progress).
class ConnStream : public httplib::Stream {
 public:
  ConnStream(int fd, const std::string& data, int write_timeout_ms)
      : fd_(fd), data_(data), write_timeout_ms_(write_timeout_ms) {}

  bool is_readable() const override { return pos_ < data_.size(); }
  bool is_writable() const override {
    if (failed_ || peer_gone(fd_)) return false;
    pollfd p{fd_, POLLOUT, 0};
    return ::poll(&p, 1, write_timeout_ms_) > 0 && (p.revents & POLLOUT) &&
           !(p.revents & (POLLERR | POLLHUP));
  }
  ssize_t read(char* ptr, size_t size) override {
    const size_t n = std::min(size, data_.size() - pos_);
    std::memcpy(ptr, data_.data() + pos_, n);
    pos_ += n;
    return static_cast<ssize_t>(n);
  }
  ssize_t write(const char* ptr, size_t size) override {
    size_t done = 0;
    while (done < size && !failed_) {
      const ssize_t n = ::send(fd_, ptr + done, size - done, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        pollfd p{fd_, POLLOUT, 0};
        const int r = ::poll(&p, 1, write_timeout_ms_);
        if (r > 0 && !(p.revents & (POLLERR | POLLHUP | POLLNVAL))) continue;
        if (r < 0 && errno == EINTR) continue;
      }
      failed_ = true;
    }
    return failed_ ? -1 : static_cast<ssize_t>(size);
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage a{};
    socklen_t len = sizeof(a);
    if (::getpeername(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0) name(a, ip, port);
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage a{};
    socklen_t len = sizeof(a);
    if (::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0) name(a, ip, port);
  }
  socket_t socket() const override { return fd_; }
  bool failed() const { return failed_; }

 private:
  static void name(const sockaddr_storage& a, std::string& ip, int& port) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (a.ss_family == AF_INET) {
      const auto* s = reinterpret_cast<const sockaddr_in*>(&a);
      ::inet_ntop(AF_INET, &s->sin_addr, buf, sizeof(buf));
      port = ntohs(s->sin_port);
    } else if (a.ss_family == AF_INET6) {
      const auto* s = reinterpret_cast<const sockaddr_in6*>(&a);
      ::inet_ntop(AF_INET6, &s->sin6_addr, buf, sizeof(buf));
      port = ntohs(s->sin6_port);
    }
    ip = buf;
  }

  int fd_;
  const std::string& data_;
  size_t pos_ = 0;
  int write_timeout_ms_;
  bool failed_ = false;
};

// Sends what fits now (responses of the front are small; the socket buffer is empty).
void send_now(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\')
      o += '\\', o += c;
    else if (static_cast<unsigned char>(c) < 0x20)
      o += ' ';
    else
      o += c;
  }
  return o;
}

}  // namespace

std::string error_response(int status, const std::string& message, const std::string& code) {
  const std::string body = "{\"error\":{\"message\":\"" + json_escape(message) +
                           "\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":" +
                           (code.empty() ? "null" : "\"" + json_escape(code) + "\"") + "}}";
  return "HTTP/1.1 " + std::to_string(status) + " " + reason(status) +
         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\nConnection: close\r\n\r\n" + body;
}

bool client_disconnected() {
  if (tl_stopping && tl_stopping->load()) return true;
  return tl_fd >= 0 && peer_gone(tl_fd);
}

// ---- RequestParser ----

RequestParser::State RequestParser::fail(int status, std::string msg) {
  phase_ = Phase::kError;
  err_status_ = status;
  err_msg_ = std::move(msg);
  return State::kError;
}

bool RequestParser::take_continue() {
  if (!expect_continue_) return false;
  expect_continue_ = false;
  return phase_ != Phase::kDone && phase_ != Phase::kError;
}

RequestParser::State RequestParser::parse() {
  const State s = parse_step();
  // Consumed input leaves its capacity behind; a large upload's buffer goes once it is read.
  if (in_.capacity() > (256u << 10) && in_.size() < in_.capacity() / 4) in_.shrink_to_fit();
  return s;
}

RequestParser::State RequestParser::parse_step() {
  if (phase_ == Phase::kError) return State::kError;
  if (phase_ == Phase::kDone) return State::kComplete;
  if (phase_ == Phase::kHead) {
    // Empty lines before a request are skipped (RFC 9112 2.2).
    const size_t lead = in_.find_first_not_of("\r\n");
    if (lead == npos) {
      in_.clear();
      scanned_ = 0;
      return State::kNeedMore;
    }
    if (lead > 0) {
      in_.erase(0, lead);
      scanned_ = 0;
    }
    size_t end = npos;
    for (size_t i = scanned_ > 0 ? scanned_ - 1 : 0; i < in_.size(); ++i) {
      if (in_[i] != '\n') continue;
      if (i + 1 < in_.size() && in_[i + 1] == '\n')
        end = i + 2;
      else if (i + 2 < in_.size() && in_[i + 1] == '\r' && in_[i + 2] == '\n')
        end = i + 3;
      if (end != npos) break;
    }
    if (end == npos) {
      scanned_ = in_.size() > 2 ? in_.size() - 2 : 0;
      if (in_.size() > lim_.max_header_bytes) return fail(431, "request header too large");
      return State::kNeedMore;
    }
    if (end > lim_.max_header_bytes + 2) return fail(431, "request header too large");
    const State s = parse_head(end);
    if (s == State::kError) return s;
    in_.erase(0, end);
    scanned_ = 0;
  }
  if (phase_ == Phase::kLength) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(left_, in_.size()));
    if (body_.empty() && n > 0) body_.reserve(static_cast<size_t>(left_));  // exact: no doubling
    body_.append(in_, 0, n);
    in_.erase(0, n);
    left_ -= n;
    if (left_ > 0) return State::kNeedMore;
    phase_ = Phase::kDone;
    return State::kComplete;
  }
  return parse_chunked();
}

RequestParser::State RequestParser::parse_chunked() {
  size_t pos = 0;
  State st = State::kNeedMore;
  while (st == State::kNeedMore) {
    if (phase_ == Phase::kChunkSize || phase_ == Phase::kTrailer) {
      const size_t nl = in_.find('\n', pos);
      if (nl == npos) {
        if (in_.size() - pos > 1024)
          st = fail(phase_ == Phase::kTrailer ? 431 : 400, "chunk line too long");
        break;
      }
      std::string_view line(in_.data() + pos, nl - pos);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      pos = nl + 1;
      if (phase_ == Phase::kTrailer) {
        if (line.empty()) {
          phase_ = Phase::kDone;
          st = State::kComplete;
        } else if ((trailer_bytes_ += line.size() + 2) > lim_.max_header_bytes) {
          st = fail(431, "chunked trailer too large");
        }
        continue;
      }
      std::string_view hex = trim(line.substr(0, line.find(';')));
      if (hex.empty() || hex.size() > 15 ||
          hex.find_first_not_of("0123456789abcdefABCDEF") != std::string_view::npos) {
        st = fail(400, "invalid chunk size");
        break;
      }
      const uint64_t size = std::stoull(std::string(hex), nullptr, 16);
      if (body_.size() + size > lim_.max_body_bytes) {
        st = fail(413, "request body too large (limit " + std::to_string(lim_.max_body_bytes) +
                           " bytes)");
        break;
      }
      if (size == 0) {
        phase_ = Phase::kTrailer;
      } else {
        left_ = size;
        phase_ = Phase::kChunkData;
      }
    } else if (phase_ == Phase::kChunkData) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(left_, in_.size() - pos));
      // Geometric growth, but never past the body limit (capacity is what buffered() counts;
      // std::string's own growth may double past it, so a fresh string takes the exact size).
      if (body_.size() + n > body_.capacity()) {
        std::string grown;
        grown.reserve(
            std::min(lim_.max_body_bytes, std::max(2 * body_.capacity(), body_.size() + n)));
        grown.append(body_);
        body_.swap(grown);
      }
      body_.append(in_, pos, n);
      pos += n;
      left_ -= n;
      if (left_ > 0) break;
      phase_ = Phase::kChunkEnd;
    } else if (phase_ == Phase::kChunkEnd) {
      if (pos >= in_.size()) break;
      if (in_[pos] == '\n') {
        ++pos;
      } else if (in_[pos] == '\r') {
        if (pos + 1 >= in_.size()) break;
        if (in_[pos + 1] != '\n') {
          st = fail(400, "invalid chunk terminator");
          break;
        }
        pos += 2;
      } else {
        st = fail(400, "invalid chunk terminator");
        break;
      }
      phase_ = Phase::kChunkSize;
    } else {
      break;
    }
  }
  in_.erase(0, pos);
  return st;
}

RequestParser::State RequestParser::parse_head(size_t end) {
  std::string_view head(in_.data(), end);
  std::vector<std::string_view> lines;
  size_t i = 0;
  while (i < head.size()) {
    size_t nl = head.find('\n', i);
    if (nl == std::string_view::npos) nl = head.size();
    std::string_view l = head.substr(i, nl - i);
    if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
    lines.push_back(l);
    i = nl + 1;
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.empty()) return fail(400, "empty request");
  if (lines.size() - 1 > lim_.max_headers)
    return fail(431, "too many header fields (limit " + std::to_string(lim_.max_headers) + ")");

  // Request line: METHOD SP target SP HTTP/1.x
  const std::string_view rl = lines[0];
  const size_t sp1 = rl.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : rl.find(' ', sp1 + 1);
  if (sp1 == std::string_view::npos || sp2 == std::string_view::npos ||
      rl.find(' ', sp2 + 1) != std::string_view::npos)
    return fail(400, "malformed request line");
  req_.method = std::string(rl.substr(0, sp1));
  req_.target = std::string(rl.substr(sp1 + 1, sp2 - sp1 - 1));
  req_.version = std::string(rl.substr(sp2 + 1));
  if (req_.method.empty() || !std::all_of(req_.method.begin(), req_.method.end(), is_tchar))
    return fail(400, "malformed request method");
  static const char* kMethods[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"};
  if (std::none_of(std::begin(kMethods), std::end(kMethods),
                   [&](const char* m) { return req_.method == m; }))
    return fail(501, "method " + req_.method + " is not implemented");
  if (req_.version != "HTTP/1.1" && req_.version != "HTTP/1.0") {
    if (req_.version.rfind("HTTP/", 0) == 0) return fail(505, "HTTP version not supported");
    return fail(400, "malformed request line");
  }
  if (req_.target.size() > lim_.max_target_bytes) return fail(414, "request target too long");
  if (req_.target.empty() || req_.target[0] != '/')
    return fail(400, "request target must be an absolute path");
  for (char c : req_.target)
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f)
      return fail(400, "invalid character in request target");

  int n_length = 0, n_te = 0;
  uint64_t length = 0;
  bool chunked = false, close = req_.version == "HTTP/1.0";
  head_ = req_.method + " " + req_.target + " " + req_.version + "\r\n";
  for (size_t k = 1; k < lines.size(); ++k) {
    const std::string_view l = lines[k];
    if (l.front() == ' ' || l.front() == '\t') return fail(400, "obsolete header line folding");
    const size_t colon = l.find(':');
    if (colon == std::string_view::npos || colon == 0) return fail(400, "malformed header line");
    const std::string_view name = l.substr(0, colon);
    if (!std::all_of(name.begin(), name.end(), is_tchar)) return fail(400, "malformed header name");
    const std::string_view value = trim(l.substr(colon + 1));
    for (char c : value)
      if (c == '\0' || c == '\r' || c == '\n') return fail(400, "invalid character in header");
    const std::string key = lower(name);
    if (key == "content-length") {
      if (++n_length > 1) return fail(400, "more than one Content-Length header");
      if (value.empty() || value.size() > 19 ||
          value.find_first_not_of("0123456789") != std::string_view::npos)
        return fail(400, "invalid Content-Length");
      length = std::stoull(std::string(value));
      continue;
    }
    if (key == "transfer-encoding") {
      if (++n_te > 1) return fail(400, "more than one Transfer-Encoding header");
      if (tokens(value) != std::vector<std::string>{"chunked"})
        return fail(501, "Transfer-Encoding '" + std::string(value) + "' is not supported");
      chunked = true;
      continue;
    }
    if (key == "content-encoding") {
      for (const std::string& t : tokens(value))
        if (t != "identity")
          return fail(415, "compressed request bodies (Content-Encoding: " + std::string(value) +
                               ") are not accepted");
      continue;
    }
    if (key == "expect") {
      if (lower(value) != "100-continue") return fail(417, "unsupported Expect");
      expect_continue_ = true;
      continue;
    }
    if (key == "connection") {
      for (const std::string& t : tokens(value)) {
        if (t == "close") close = true;
        if (t == "keep-alive" && req_.version == "HTTP/1.0") close = true;  // 1.0: one request
      }
    }
    // Byte ranges are not served on this API: the header is dropped (full 200 responses).
    if (key == "range" || key == "if-range" || key == "keep-alive") continue;
    // The API reads JSON whatever the declared type; httplib would parse form and multipart
    // bodies itself (and refuse forms over 8 KiB), so those types are not passed on. curl -d
    // sends application/x-www-form-urlencoded unless told otherwise.
    if (key == "content-type") {
      const std::string t = lower(value);
      if (t.rfind("application/x-www-form-urlencoded", 0) == 0 || t.rfind("multipart/", 0) == 0)
        continue;
    }
    head_.append(name);
    head_.append(": ");
    head_.append(value);
    head_.append("\r\n");
  }
  if (n_te > 0 && n_length > 0) return fail(400, "Content-Length together with Transfer-Encoding");
  if (chunked && req_.version == "HTTP/1.0") return fail(400, "chunked body in HTTP/1.0");
  req_.keep_alive = !close;
  if (chunked) {
    phase_ = Phase::kChunkSize;
  } else {
    if (length > lim_.max_body_bytes)
      return fail(
          413, "request body too large (limit " + std::to_string(lim_.max_body_bytes) + " bytes)");
    left_ = length;
    phase_ = Phase::kLength;
  }
  if (!chunked && length == 0) expect_continue_ = false;
  return State::kNeedMore;
}

ParsedRequest RequestParser::take() {
  ParsedRequest r = std::move(req_);
  r.body_bytes = body_.size();
  r.wire = std::move(head_);
  r.wire += "Content-Length: " + std::to_string(body_.size()) + "\r\n\r\n";
  r.wire += body_;
  req_ = ParsedRequest{};
  head_.clear();
  body_.clear();
  body_.shrink_to_fit();
  left_ = 0;
  trailer_bytes_ = 0;
  expect_continue_ = false;
  phase_ = Phase::kHead;
  scanned_ = 0;
  return r;
}

// ---- HttpFront ----

struct HttpFront::Conn {
  int fd = -1;
  RequestParser parser;
  Clock::time_point since;  // start of the current wait (idle, or the request's first byte)
  bool busy = false;        // a worker owns it
  bool draining = false;    // refused: reading and dropping input until the client closes
  bool started = false;
  size_t drained = 0;
  size_t counted = 0;  // bytes of this connection in Impl::buffered
  explicit Conn(const HttpLimits& lim) : parser(lim) {}
};

struct HttpFront::Impl {
  RoutedServer& routes;
  HttpLimits lim;
  Hooks hooks;
  std::atomic<size_t>& open;
  int listen_fd = -1, ep = -1, wake = -1;
  std::atomic<bool> stopping{false};
  std::unordered_map<int, std::unique_ptr<Conn>> conns;
  size_t buffered = 0;  // bytes of unfinished requests held by the reader, all connections
  std::mutex back_mu;
  std::deque<std::pair<Conn*, bool>> back;  // from workers: (conn, keep open)
  std::unique_ptr<httplib::ThreadPool> heavy, light;
  bool pools_down = false;

  void down_pools() {
    if (pools_down) return;
    pools_down = true;
    heavy->shutdown();
    light->shutdown();
  }

  Impl(RoutedServer& r, HttpLimits l, Hooks h, std::atomic<size_t>& o)
      : routes(r), lim(std::move(l)), hooks(std::move(h)), open(o) {}

  void watch(Conn* c) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = c->fd;
    ::epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
  }

  void close_conn(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    ::epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    buffered -= it->second->counted;
    conns.erase(it);
    open.store(conns.size());
  }

  // Answers with an error and keeps reading (and dropping) for a moment, so that the client
  // reads the answer instead of a reset.
  void refuse(Conn* c, int status, const std::string& msg, const std::string& path) {
    c->parser = RequestParser(lim);  // what it had buffered goes
    recount(c);
    send_now(c->fd, error_response(status, msg));
    ::shutdown(c->fd, SHUT_WR);
    c->draining = true;
    c->since = Clock::now();
    if (hooks.on_refused) hooks.on_refused(path, status);
  }

  void accept_all() {
    for (;;) {
      const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        return;  // EAGAIN, or out of descriptors (retried on the next event)
      }
      if (static_cast<int>(conns.size()) >= lim.max_connections && !evict_one()) {
        send_now(fd, error_response(503, "too many connections"));
        ::close(fd);
        if (hooks.on_refused) hooks.on_refused("", 503);
        continue;
      }
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      auto c = std::make_unique<Conn>(lim);
      c->fd = fd;
      c->since = Clock::now();
      Conn* raw = c.get();
      conns.emplace(fd, std::move(c));
      open.store(conns.size());
      watch(raw);
    }
  }

  // At the connection cap: the connection that has waited longest without a complete request
  // makes room (slow or idle clients cannot lock newcomers out).
  bool evict_one() {
    Conn* oldest = nullptr;
    for (auto& [fd, c] : conns)
      if (!c->busy && (!oldest || c->since < oldest->since)) oldest = c.get();
    if (!oldest) return false;
    close_conn(oldest->fd);
    return true;
  }

  void on_readable(Conn* c) {
    char buf[65536];
    for (;;) {
      const ssize_t n = ::recv(c->fd, buf, sizeof(buf), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n <= 0) return close_conn(c->fd);
      if (c->draining) {
        c->drained += static_cast<size_t>(n);
        if (c->drained > (1u << 20)) return close_conn(c->fd);
        continue;
      }
      c->parser.append(buf, static_cast<size_t>(n));
      if (advance(c)) return;  // handed to a worker, refused, or closed
    }
  }

  void recount(Conn* c) {
    const size_t now = c->parser.buffered();
    buffered = buffered - c->counted + now;
    c->counted = now;
  }

  // Parses what is buffered; true when the connection left the reading state.
  bool advance(Conn* c) {
    const bool left = advance_inner(c);
    if (!c->draining) {
      recount(c);
      // Many large unfinished requests at once: the one that crosses the budget is refused.
      if (!left && buffered > lim.max_buffered_bytes) {
        refuse(c, 503, "server busy: too many request bytes in flight", "");
        return true;
      }
    }
    return left;
  }

  bool advance_inner(Conn* c) {
    if (!c->started && c->parser.started()) {
      c->started = true;
      c->since = Clock::now();
    }
    const RequestParser::State st = c->parser.parse();
    if (st == RequestParser::State::kError) {
      refuse(c, c->parser.error_status(), c->parser.error_message(), "");
      return true;
    }
    if (st == RequestParser::State::kNeedMore) {
      if (c->parser.take_continue()) send_now(c->fd, "HTTP/1.1 100 Continue\r\n\r\n");
      return false;
    }
    dispatch(c, c->parser.take());
    return true;
  }

  void dispatch(Conn* c, ParsedRequest r) {
    ::epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, nullptr);
    c->busy = true;
    const bool heavy_req = hooks.heavy && hooks.heavy(r);
    auto job = [this, c, req = std::make_shared<ParsedRequest>(std::move(r))] {
      tl_fd = c->fd;
      tl_stopping = &stopping;
      ConnStream s(c->fd, req->wire, lim.write_timeout_ms);
      bool closed = false;
      bool ok = false;
      try {
        ok = routes.handle(s, !req->keep_alive, closed);
      } catch (...) {
        ok = false;
      }
      tl_fd = -1;
      const bool keep = ok && !s.failed() && req->keep_alive && !closed && !stopping.load();
      {
        std::lock_guard<std::mutex> lk(back_mu);
        back.emplace_back(c, keep);
      }
      const uint64_t one = 1;
      [[maybe_unused]] ssize_t w = ::write(wake, &one, sizeof(one));
    };
    (heavy_req ? heavy : light)->enqueue(std::move(job));
  }

  void take_back() {
    std::deque<std::pair<Conn*, bool>> got;
    {
      std::lock_guard<std::mutex> lk(back_mu);
      got.swap(back);
    }
    for (auto [c, keep] : got) {
      c->busy = false;
      if (!keep || stopping.load()) {
        close_conn(c->fd);
        continue;
      }
      c->started = false;
      c->since = Clock::now();
      watch(c);
      advance(c);  // a pipelined request may be buffered already
    }
  }

  void sweep() {
    const auto now = Clock::now();
    std::vector<int> expired;
    for (auto& [fd, c] : conns) {
      if (c->busy) continue;
      const auto waited =
          std::chrono::duration_cast<std::chrono::milliseconds>(now - c->since).count();
      if (c->draining) {
        if (waited > 1000) expired.push_back(fd);
      } else if (!c->started) {
        if (waited > lim.idle_timeout_ms) expired.push_back(fd);
      } else if (waited >
                 (c->parser.head_done() ? lim.request_timeout_ms : lim.header_timeout_ms)) {
        refuse(c.get(), 408, "request not received in time", "");
      }
    }
    for (int fd : expired) close_conn(fd);
  }

  void run() {
    routes.set_live(true);
    epoll_event evs[256];
    auto last_sweep = Clock::now();
    while (!stopping.load()) {
      const int n = ::epoll_wait(ep, evs, 256, 100);
      for (int i = 0; i < n; ++i) {
        const int fd = evs[i].data.fd;
        if (fd == listen_fd) {
          accept_all();
        } else if (fd == wake) {
          uint64_t v;
          [[maybe_unused]] ssize_t r = ::read(wake, &v, sizeof(v));
          take_back();
        } else {
          auto it = conns.find(fd);
          if (it != conns.end() && !it->second->busy) on_readable(it->second.get());
        }
      }
      if (Clock::now() - last_sweep > std::chrono::milliseconds(100)) {
        sweep();
        last_sweep = Clock::now();
      }
    }
    routes.set_live(false);  // streaming responses end
    ::close(listen_fd);
    listen_fd = -1;
    // Workers finish what they hold (handlers see client_disconnected()), then every socket goes.
    down_pools();
    take_back();
    std::vector<int> fds;
    for (auto& [fd, c] : conns) fds.push_back(fd);
    for (int fd : fds) close_conn(fd);
  }
};

HttpFront::HttpFront(RoutedServer& routes, HttpLimits lim, Hooks hooks)
    : impl_(std::make_unique<Impl>(routes, std::move(lim), std::move(hooks), open_)) {
  // Each connection is a descriptor: raise the soft limit to the hard one, and keep the
  // connection cap below it.
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    if (rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      ::setrlimit(RLIMIT_NOFILE, &rl);
      ::getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur != RLIM_INFINITY) {
      const int cap = static_cast<int>(std::min<rlim_t>(rl.rlim_cur, 1u << 20)) - 128;
      impl_->lim.max_connections = std::max(16, std::min(impl_->lim.max_connections, cap / 2));
    }
  }
  impl_->ep = ::epoll_create1(EPOLL_CLOEXEC);
  impl_->wake = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl_->ep < 0 || impl_->wake < 0) throw Error("http: epoll/eventfd failed");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = impl_->wake;
  ::epoll_ctl(impl_->ep, EPOLL_CTL_ADD, impl_->wake, &ev);
  impl_->heavy = std::make_unique<httplib::ThreadPool>(std::max(1, impl_->lim.workers));
  impl_->light = std::make_unique<httplib::ThreadPool>(std::max(1, impl_->lim.light_workers));
}

HttpFront::~HttpFront() {
  impl_->down_pools();
  if (impl_->listen_fd >= 0) ::close(impl_->listen_fd);  // bound but never served
  ::close(impl_->ep);
  ::close(impl_->wake);
}

int HttpFront::bind(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string p = std::to_string(port);
  if (::getaddrinfo(host.empty() ? nullptr : host.c_str(), p.c_str(), &hints, &res) != 0 || !res)
    throw Error("cannot resolve " + host);
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 1024) == 0) break;
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(res);
  if (fd < 0) throw Error("cannot listen on " + host + ":" + p);
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int bound = a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port)
                                            : ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
  impl_->listen_fd = fd;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  ::epoll_ctl(impl_->ep, EPOLL_CTL_ADD, fd, &ev);
  return bound;
}

void HttpFront::serve() {
  if (impl_->listen_fd < 0) throw Error("http: serve() before bind()");
  impl_->run();
}

void HttpFront::stop() {
  impl_->stopping.store(true);
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(impl_->wake, &one, sizeof(one));
}

}  // namespace redknot::server
