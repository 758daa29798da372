#include "reuse/remote_tier.h"

#include <algorithm>
#include <cstdlib>

#include "core/error.h"

#if REDKNOT_HAS_REDIS
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>

#include <ctime>
#endif

namespace redknot {

namespace {

struct ParsedUrl {
  bool unix_socket = false;
  std::string host, path;
  int port = 0;
};

// "" on success.
std::string parse_url(const std::string& url, ParsedUrl& p) {
  const std::string redis = "redis://", unix_ = "unix://";
  if (url.rfind(unix_, 0) == 0) {
    p.unix_socket = true;
    p.path = url.substr(unix_.size());
    if (p.path.empty() || p.path[0] != '/')
      return "unix:// needs an absolute path (unix:///x.sock)";
    return "";
  }
  if (url.rfind(redis, 0) != 0) return "expected redis://host:port or unix:///path.sock";
  const std::string rest = url.substr(redis.size());
  if (rest.find('@') != std::string::npos) return "credentials in the URL are not supported";
  const size_t colon = rest.rfind(':');
  std::string port = "6379";
  p.host = rest;
  if (colon != std::string::npos) {
    p.host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
  }
  while (!port.empty() && port.back() == '/') port.pop_back();  // redis://h:p/
  if (p.host.empty()) return "missing host";
  if (port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return "bad port '" + port + "'";
  p.port = std::atoi(port.c_str());
  if (p.port < 1 || p.port > 65535) return "port out of range";
  return "";
}

#if REDKNOT_HAS_REDIS

timeval to_tv(int ms) {
  timeval tv;
  tv.tv_sec = ms / 1000;
  tv.tv_usec = (ms % 1000) * 1000;
  return tv;
}

// A write to a connection Redis closed raises SIGPIPE, which would kill a process that has not
// ignored it (tests, benches): blocked on this thread for the call, and a SIGPIPE it raised
// consumed before unblocking.
class SigpipeGuard {
 public:
  SigpipeGuard() {
    sigemptyset(&mask_);
    sigaddset(&mask_, SIGPIPE);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &mask_, &old_);
  }
  ~SigpipeGuard() {
    if (!was_pending_) {
      sigset_t pending;
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        const timespec zero{0, 0};
        sigtimedwait(&mask_, nullptr, &zero);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

 private:
  sigset_t mask_, old_;
  bool was_pending_ = false;
};

// One connection, used by one thread at a time (the store gives its reader and its writer one
// each); a mutex makes misuse safe anyway.
class RedisKv final : public RemoteKv {
 public:
  RedisKv(std::string url, ParsedUrl p, RemoteKvOptions o)
      : url_(std::move(url)), p_(std::move(p)), o_(o) {}
  ~RedisKv() override {
    if (ctx_) redisFree(ctx_);
  }
  std::string describe() const override { return url_; }

  Status get(const std::string& key, std::string* value) override {
    std::lock_guard<std::mutex> l(mu_);
    SigpipeGuard pipe;
    if (!connected()) return Status::Error;
    redisReply* r = static_cast<redisReply*>(
        redisCommand(ctx_, "GET %b", key.data(), static_cast<size_t>(key.size())));
    if (r == nullptr) return broken();
    Status st = Status::Error;
    if (r->type == REDIS_REPLY_NIL) st = Status::Missing;
    if (r->type == REDIS_REPLY_STRING) {
      value->assign(r->str, r->len);
      st = Status::Ok;
    }
    freeReplyObject(r);
    return st;
  }

  Status get_ranges(std::span<const Range> ranges, std::vector<std::string>* out) override {
    std::lock_guard<std::mutex> l(mu_);
    SigpipeGuard pipe;
    out->assign(ranges.size(), std::string());
    if (ranges.empty()) return Status::Ok;
    if (!connected()) return Status::Error;
    for (const Range& rg : ranges) {
      const std::string a = std::to_string(rg.offset), b = std::to_string(rg.offset + rg.len - 1);
      if (redisAppendCommand(ctx_, "GETRANGE %b %s %s", rg.key.data(),
                             static_cast<size_t>(rg.key.size()), a.c_str(), b.c_str()) != REDIS_OK)
        return broken();
    }
    Status st = Status::Ok;
    for (size_t i = 0; i < ranges.size(); ++i) {
      void* rv = nullptr;
      if (redisGetReply(ctx_, &rv) != REDIS_OK || rv == nullptr) return broken();
      auto* r = static_cast<redisReply*>(rv);
      if (r->type == REDIS_REPLY_STRING)
        (*out)[i].assign(r->str, r->len);
      else
        st = Status::Error;
      freeReplyObject(r);
    }
    return st;
  }

  Status put_many(std::span<const std::pair<std::string, std::string>> kvs) override {
    std::lock_guard<std::mutex> l(mu_);
    SigpipeGuard pipe;
    if (kvs.empty()) return Status::Ok;
    if (!connected()) return Status::Error;
    for (const auto& [k, v] : kvs)
      if (redisAppendCommand(ctx_, "SET %b %b", k.data(), static_cast<size_t>(k.size()), v.data(),
                             static_cast<size_t>(v.size())) != REDIS_OK)
        return broken();
    return drain(kvs.size());
  }

  Status del(std::span<const std::string> keys) override {
    std::lock_guard<std::mutex> l(mu_);
    SigpipeGuard pipe;
    if (keys.empty()) return Status::Ok;
    if (!connected()) return Status::Error;
    for (const std::string& k : keys)
      if (redisAppendCommand(ctx_, "DEL %b", k.data(), static_cast<size_t>(k.size())) != REDIS_OK)
        return broken();
    return drain(keys.size());
  }

  Status exists(const std::string& key) override {
    std::lock_guard<std::mutex> l(mu_);
    SigpipeGuard pipe;
    if (!connected()) return Status::Error;
    redisReply* r = static_cast<redisReply*>(
        redisCommand(ctx_, "EXISTS %b", key.data(), static_cast<size_t>(key.size())));
    if (r == nullptr) return broken();
    const Status st = r->type == REDIS_REPLY_INTEGER
                          ? (r->integer > 0 ? Status::Ok : Status::Missing)
                          : Status::Error;
    freeReplyObject(r);
    return st;
  }

 private:
  // Replies of n pipelined commands; any error reply fails the batch.
  Status drain(size_t n) {
    Status st = Status::Ok;
    for (size_t i = 0; i < n; ++i) {
      void* rv = nullptr;
      if (redisGetReply(ctx_, &rv) != REDIS_OK || rv == nullptr) return broken();
      auto* r = static_cast<redisReply*>(rv);
      if (r->type == REDIS_REPLY_ERROR) st = Status::Error;
      freeReplyObject(r);
    }
    return st;
  }
  // The connection is unusable (I/O error, timeout): drop it, reconnect on a later call.
  Status broken() {
    if (ctx_) redisFree(ctx_);
    ctx_ = nullptr;
    next_try_ = std::chrono::steady_clock::now();  // a live server gets one immediate retry
    return Status::Error;
  }
  bool connected() {
    if (ctx_ && ctx_->err == 0) return true;
    if (ctx_) {
      redisFree(ctx_);
      ctx_ = nullptr;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now < next_try_) return false;
    const timeval ct = to_tv(o_.connect_timeout_ms);
    ctx_ = p_.unix_socket ? redisConnectUnixWithTimeout(p_.path.c_str(), ct)
                          : redisConnectWithTimeout(p_.host.c_str(), p_.port, ct);
    if (ctx_ && ctx_->err == 0 && redisSetTimeout(ctx_, to_tv(o_.io_timeout_ms)) == REDIS_OK) {
      backoff_ms_ = 0;
      return true;
    }
    if (ctx_) redisFree(ctx_);
    ctx_ = nullptr;
    backoff_ms_ = std::clamp(backoff_ms_ * 2, o_.backoff_min_ms, o_.backoff_max_ms);
    next_try_ = now + std::chrono::milliseconds(backoff_ms_);
    return false;
  }

  std::string url_;
  ParsedUrl p_;
  RemoteKvOptions o_;
  std::mutex mu_;
  redisContext* ctx_ = nullptr;
  int backoff_ms_ = 0;
  std::chrono::steady_clock::time_point next_try_{};
};

#endif

}  // namespace

std::string check_redis_url(const std::string& url) {
  ParsedUrl p;
  return parse_url(url, p);
}

bool redis_kv_available() {
#if REDKNOT_HAS_REDIS
  return true;
#else
  return false;
#endif
}

std::unique_ptr<RemoteKv> make_redis_kv(const std::string& url, const RemoteKvOptions& opts) {
  ParsedUrl p;
  const std::string bad = parse_url(url, p);
  if (!bad.empty()) throw Error("chunk store remote tier: bad URL '" + url + "': " + bad);
  if (opts.connect_timeout_ms <= 0 || opts.io_timeout_ms <= 0)
    throw Error("chunk store remote tier: timeouts must be > 0 ms");
#if REDKNOT_HAS_REDIS
  return std::make_unique<RedisKv>(url, std::move(p), opts);
#else
  throw Error(
      "chunk store remote tier: this build has no Redis support (hiredis not found; "
      "install libhiredis-dev and rebuild with -DREDKNOT_REDIS=ON)");
#endif
}

// ---- in-memory fake ----

RemoteKv::Status MemoryRemoteKv::get(const std::string& key, std::string* value) {
  std::lock_guard<std::mutex> l(s_->mu);
  if (s_->down) return Status::Error;
  auto it = s_->data.find(key);
  if (it == s_->data.end()) return Status::Missing;
  *value = it->second;
  s_->bytes_read += static_cast<int64_t>(value->size());
  return Status::Ok;
}

RemoteKv::Status MemoryRemoteKv::get_ranges(std::span<const Range> ranges,
                                            std::vector<std::string>* out) {
  std::lock_guard<std::mutex> l(s_->mu);
  if (s_->down) return Status::Error;
  out->assign(ranges.size(), std::string());
  for (size_t i = 0; i < ranges.size(); ++i) {
    auto it = s_->data.find(ranges[i].key);
    if (it == s_->data.end()) continue;
    const int64_t n = static_cast<int64_t>(it->second.size());
    const int64_t a = std::min(ranges[i].offset, n), b = std::min(a + ranges[i].len, n);
    (*out)[i] = it->second.substr(a, b - a);
    s_->bytes_read += b - a;
  }
  return Status::Ok;
}

RemoteKv::Status MemoryRemoteKv::put_many(
    std::span<const std::pair<std::string, std::string>> kvs) {
  std::lock_guard<std::mutex> l(s_->mu);
  if (s_->down) return Status::Error;
  for (const auto& [k, v] : kvs) s_->data[k] = v;
  return Status::Ok;
}

RemoteKv::Status MemoryRemoteKv::del(std::span<const std::string> keys) {
  std::lock_guard<std::mutex> l(s_->mu);
  if (s_->down) return Status::Error;
  for (const auto& k : keys) s_->data.erase(k);
  return Status::Ok;
}

RemoteKv::Status MemoryRemoteKv::exists(const std::string& key) {
  std::lock_guard<std::mutex> l(s_->mu);
  if (s_->down) return Status::Error;
  return s_->data.count(key) ? Status::Ok : Status::Missing;
}

}  // namespace redknot
