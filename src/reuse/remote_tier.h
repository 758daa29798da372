// The chunk store's remote tier seam (issue #22): a key-value store shared by several server
// instances (Redis through hiredis; an in-memory fake for unit tests; none when off). The store
// keeps its segments there in head-major shards (chunk_store.h, "Remote tier"), so that a reader
// fetches only the row blocks its destination keeps.
//
// Every failure (connection refused or lost, timeout, protocol error) is reported as Status::Error
// and never thrown: the store counts it and treats the segment as a miss. A broken connection is
// retried on a later call, with exponential backoff between attempts, so a Redis restart heals by
// itself and a Redis that is down costs one failed connect per backoff period, not per call.
#pragma once
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace redknot {

class RemoteKv {
 public:
  enum class Status : uint8_t { Ok, Missing, Error };
  // Bytes [offset, offset + len) of `key` (GETRANGE: a missing key or a range past the end gives
  // fewer bytes, which the caller checks).
  struct Range {
    std::string key;
    int64_t offset = 0, len = 0;
  };

  virtual ~RemoteKv() = default;
  // For logs: the URL (no credentials ever appear in one we accept).
  virtual std::string describe() const = 0;
  virtual Status get(const std::string& key, std::string* value) = 0;
  // Pipelined: one round trip for all ranges; out[i] holds range i's bytes.
  virtual Status get_ranges(std::span<const Range> ranges, std::vector<std::string>* out) = 0;
  // Pipelined, in order: the caller puts the value a reader checks for last.
  virtual Status put_many(std::span<const std::pair<std::string, std::string>> kvs) = 0;
  virtual Status del(std::span<const std::string> keys) = 0;
  virtual Status exists(const std::string& key) = 0;  // Ok or Missing
};

struct RemoteKvOptions {
  int connect_timeout_ms = 200;
  int io_timeout_ms = 2000;
  int backoff_min_ms = 100;  // first wait after a failed connect; doubles per failure
  int backoff_max_ms = 5000;
};

// `redis://host:port` or `unix:///path.sock`. Throws Error for anything else (or when built
// without hiredis), so that a bad flag fails at startup; never connects here (the first call does).
std::unique_ptr<RemoteKv> make_redis_kv(const std::string& url, const RemoteKvOptions& opts = {});
// Whether this build has the Redis tier (REDKNOT_REDIS).
bool redis_kv_available();
// Checks a URL's form without connecting; "" or what is wrong with it.
std::string check_redis_url(const std::string& url);

// The "off" tier: always a miss, never stores anything (a store with no remote behaves the same;
// this exists for callers that want an object).
class NullRemoteKv final : public RemoteKv {
 public:
  std::string describe() const override { return "off"; }
  Status get(const std::string&, std::string*) override { return Status::Missing; }
  Status get_ranges(std::span<const Range> r, std::vector<std::string>* out) override {
    out->assign(r.size(), std::string());
    return Status::Ok;
  }
  Status put_many(std::span<const std::pair<std::string, std::string>>) override {
    return Status::Ok;
  }
  Status del(std::span<const std::string>) override { return Status::Ok; }
  Status exists(const std::string&) override { return Status::Missing; }
};

// Unit tests: a map behind a mutex, shared by several handles (two "instances"), with a switch
// that makes every call fail (a Redis gone away) and a tally of bytes returned.
class MemoryRemoteKv final : public RemoteKv {
 public:
  struct Shared {
    std::mutex mu;
    std::map<std::string, std::string> data;
    bool down = false;
    int64_t bytes_read = 0;
  };
  explicit MemoryRemoteKv(std::shared_ptr<Shared> s) : s_(std::move(s)) {}
  std::string describe() const override { return "memory"; }
  Status get(const std::string& key, std::string* value) override;
  Status get_ranges(std::span<const Range> ranges, std::vector<std::string>* out) override;
  Status put_many(std::span<const std::pair<std::string, std::string>> kvs) override;
  Status del(std::span<const std::string> keys) override;
  Status exists(const std::string& key) override;

 private:
  std::shared_ptr<Shared> s_;
};

}  // namespace redknot
