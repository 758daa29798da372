// HttpFront: the request reader (limits, framing) and the server over loopback sockets
// (slow clients, pipelining, Range, disconnects, the connection cap).
#include "server/http_front.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

namespace redknot::server {
namespace {

using State = RequestParser::State;
using Clock = std::chrono::steady_clock;

// Feeds `s` in pieces of `step` bytes; returns the final state.
State feed(RequestParser& p, const std::string& s, size_t step = 1 << 20) {
  State st = State::kNeedMore;
  for (size_t i = 0; i < s.size() && st == State::kNeedMore; i += step) {
    p.append(s.data() + i, std::min(step, s.size() - i));
    st = p.parse();
  }
  return st;
}

int refused(const std::string& req, HttpLimits lim = {}) {
  RequestParser p(lim);
  return feed(p, req) == State::kError ? p.error_status() : 0;
}

TEST(RequestParser, ContentLengthAndChunkedBodiesByteByByte) {
  HttpLimits lim;
  for (size_t step : {size_t{1}, size_t{7}, size_t{4096}}) {
    RequestParser p(lim);
    ASSERT_EQ(feed(p, "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", step),
              State::kComplete);
    ParsedRequest r = p.take();
    EXPECT_EQ(r.method, "POST");
    EXPECT_EQ(r.path(), "/x");
    EXPECT_EQ(r.body_bytes, 5u);
    EXPECT_TRUE(r.keep_alive);
    EXPECT_EQ(r.wire, "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");

    RequestParser q(lim);
    ASSERT_EQ(feed(q,
                   "POST /y?a=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
                   step),
              State::kComplete);
    r = q.take();
    EXPECT_EQ(r.path(), "/y");
    EXPECT_EQ(r.wire, "POST /y?a=1 HTTP/1.1\r\nContent-Length: 13\r\n\r\nabc0123456789");
  }
}

TEST(RequestParser, BodyLimitHoldsForEveryFraming) {
  HttpLimits lim;
  lim.max_body_bytes = 1000;
  // Content-Length: refused from the head, before any body byte is buffered.
  RequestParser p(lim);
  EXPECT_EQ(feed(p, "POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n"), State::kError);
  EXPECT_EQ(p.error_status(), 413);
  // Chunked: refused at the chunk that would cross the limit; never more than the limit held.
  RequestParser q(lim);
  std::string req = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
  State st = feed(q, req);
  size_t peak = 0;
  for (int i = 0; i < 100 && st == State::kNeedMore; ++i) {
    st = feed(q, "64\r\n" + std::string(100, 'x') + "\r\n", 13);
    peak = std::max(peak, q.buffered());
  }
  EXPECT_EQ(st, State::kError);
  EXPECT_EQ(q.error_status(), 413);
  EXPECT_LE(peak, lim.max_body_bytes + 200);
  // One huge chunk announced: refused from its size line.
  EXPECT_EQ(refused(req + "FFFFFFFF\r\n", lim), 413);
  EXPECT_EQ(refused(req + "FFFFFFFFFFFFFFFFFFFF\r\n", lim), 400);
  EXPECT_EQ(refused(req + "zz\r\n", lim), 400);
}

TEST(RequestParser, RefusesAmbiguousFramingAndCompressedBodies) {
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"), 400);
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"), 400);
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400);
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n"), 400);
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), 501);
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: "
                    "chunked\r\n\r\n"),
            400);
  EXPECT_EQ(refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
  for (const char* enc : {"gzip", "deflate", "br", "x-gzip", "identity, gzip"})
    EXPECT_EQ(refused(std::string("POST / HTTP/1.1\r\nContent-Encoding: ") + enc +
                      "\r\nContent-Length: 2\r\n\r\nab"),
              415)
        << enc;
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nContent-Encoding: identity\r\nContent-Length: 0\r\n\r\n"),
            0);
  EXPECT_EQ(refused("POST / HTTP/1.1\r\nExpect: something\r\n\r\n"), 417);
}

TEST(RequestParser, HeaderLimitsAndMalformedHeads) {
  std::string many = "GET / HTTP/1.1\r\n";
  for (int i = 0; i < 101; ++i) many += "X-" + std::to_string(i) + ": v\r\n";
  EXPECT_EQ(refused(many + "\r\n"), 431);
  EXPECT_EQ(refused("GET / HTTP/1.1\r\nX: " + std::string(20000, 'a') + "\r\n\r\n"), 431);
  // A head that never ends is refused as soon as it is too large.
  RequestParser p(HttpLimits{});
  EXPECT_EQ(feed(p, "GET / HTTP/1.1\r\nX: " + std::string(17000, 'a'), 100), State::kError);
  EXPECT_EQ(p.error_status(), 431);
  EXPECT_EQ(refused("GET /" + std::string(9000, 'a') + " HTTP/1.1\r\n\r\n"), 414);
  EXPECT_EQ(refused("HELLO\r\n\r\n"), 400);
  EXPECT_EQ(refused("GET / HTTP/2.0\r\n\r\n"), 505);
  EXPECT_EQ(refused("BREW / HTTP/1.1\r\n\r\n"), 501);
  EXPECT_EQ(refused("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
  EXPECT_EQ(refused("GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n"), 400);
  EXPECT_EQ(refused("GET / HTTP/1.1\r\nBad Name: a\r\n\r\n"), 400);
  EXPECT_EQ(refused("GET / HTTP/1.1\r\nNoColon\r\n\r\n"), 400);
}

TEST(RequestParser, DropsRangeAndFramingHeadersAndKeepsPipelinedBytes) {
  RequestParser p(HttpLimits{});
  ASSERT_EQ(feed(p,
                 "GET /a HTTP/1.1\r\nRange: bytes=0-1\r\nIf-Range: x\r\nExpect: 100-continue\r\n"
                 "X-Keep: 1\r\n\r\n\r\nGET /b HTTP/1.1\nConnection: close\n\n"),
            State::kComplete);
  ParsedRequest a = p.take();
  EXPECT_EQ(a.wire, "GET /a HTTP/1.1\r\nX-Keep: 1\r\nContent-Length: 0\r\n\r\n");
  ASSERT_EQ(p.parse(), State::kComplete);  // the second request was buffered already
  ParsedRequest b = p.take();
  EXPECT_EQ(b.path(), "/b");
  EXPECT_FALSE(b.keep_alive);
  EXPECT_EQ(p.parse(), State::kNeedMore);
  EXPECT_FALSE(p.started());
  RequestParser f(HttpLimits{});
  ASSERT_EQ(feed(f,
                 "POST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 "Content-Length: 2\r\n\r\n{}"),
            State::kComplete);
  EXPECT_EQ(f.take().wire, "POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
  RequestParser h(HttpLimits{});
  ASSERT_EQ(feed(h, "GET / HTTP/1.0\r\n\r\n"), State::kComplete);
  EXPECT_FALSE(h.take().keep_alive);
}

// ---- over sockets ----

int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

// Reads until the peer closes or `want` responses (by status line) have fully arrived.
std::string read_reply(int fd, int timeout_ms = 3000, int want = 0) {
  std::string out;
  const auto end = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (want > 0) {
      int complete = 0;
      size_t pos = 0;
      while ((pos = out.find("HTTP/1.1 ", pos)) != std::string::npos) {
        const size_t he = out.find("\r\n\r\n", pos);
        if (he == std::string::npos) break;
        const size_t cl = out.find("Content-Length: ", pos);
        const size_t len = cl < he ? std::stoul(out.substr(cl + 16)) : 0;
        if (out.size() < he + 4 + len) break;
        ++complete;
        pos = he + 4 + len;
      }
      if (complete >= want) return out;
    }
    const int left = static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now()).count());
    if (left <= 0) return out;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, left) <= 0) return out;
    char buf[65536];
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

int status_of(const std::string& reply) {
  if (reply.rfind("HTTP/1.1 ", 0) != 0) return 0;
  return std::stoi(reply.substr(9, 3));
}

std::string roundtrip(int port, const std::string& req, int timeout_ms = 3000) {
  const int fd = connect_to(port);
  send_all(fd, req);
  std::string r = read_reply(fd, timeout_ms, 1);
  ::close(fd);
  return r;
}

class FrontTest : public ::testing::Test {
 protected:
  void SetUp() override {
    routes_.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("ok", "text/plain");
    });
    routes_.Get("/big", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(std::string(100000, 'b'), "text/plain");
    });
    routes_.Post("/echo", [](const httplib::Request& req, httplib::Response& res) {
      res.set_content(std::to_string(req.body.size()) + ":" + req.body.substr(0, 8), "text/plain");
    });
    routes_.Get("/wait", [this](const httplib::Request&, httplib::Response& res) {
      waiting_ = true;
      const auto end = Clock::now() + std::chrono::seconds(5);
      while (Clock::now() < end && !client_disconnected())
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      saw_disconnect_ = client_disconnected();
      res.set_content("late", "text/plain");
    });
  }
  void start(HttpLimits lim) {
    lim.max_body_bytes = 1000;
    HttpFront::Hooks hooks;
    hooks.heavy = [](const ParsedRequest& r) { return r.path() == "/wait"; };
    front_ = std::make_unique<HttpFront>(routes_, lim, hooks);
    port_ = front_->bind("127.0.0.1", 0);
    thread_ = std::thread([this] { front_->serve(); });
  }
  void TearDown() override {
    if (front_) front_->stop();
    if (thread_.joinable()) thread_.join();
  }

  RoutedServer routes_;
  std::unique_ptr<HttpFront> front_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<bool> waiting_{false}, saw_disconnect_{false};
};

TEST_F(FrontTest, FramingErrorsOverTheWire) {
  start(HttpLimits{});
  std::string r = roundtrip(port_, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(status_of(r), 200);
  EXPECT_NE(r.find("\r\n\r\nok"), std::string::npos);
  r = roundtrip(port_,
                "POST /echo HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd");
  EXPECT_EQ(status_of(r), 415);
  EXPECT_NE(r.find("Connection: close"), std::string::npos);
  EXPECT_EQ(status_of(roundtrip(port_,
                                "POST /echo HTTP/1.1\r\nContent-Length: 1\r\n"
                                "Content-Length: 2\r\n\r\nab")),
            400);
  std::string many = "GET /health HTTP/1.1\r\n";
  for (int i = 0; i < 200; ++i) many += "X-" + std::to_string(i) + ": v\r\n";
  EXPECT_EQ(status_of(roundtrip(port_, many + "\r\n")), 431);
  // A chunked body over the limit: 413 while it is still being sent.
  const int fd = connect_to(port_);
  send_all(fd, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
  for (int i = 0; i < 20; ++i) send_all(fd, "64\r\n" + std::string(100, 'x') + "\r\n");
  EXPECT_EQ(status_of(read_reply(fd, 3000, 1)), 413);
  ::close(fd);
  // A chunked body within the limit reaches the handler de-chunked.
  r = roundtrip(port_,
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                "4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n");
  EXPECT_EQ(status_of(r), 200);
  EXPECT_NE(r.find("\r\n\r\n6:abcdef"), std::string::npos);
  // Expect: 100-continue is answered before the body is sent.
  const int fe = connect_to(port_);
  send_all(fe, "POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
  std::string cont;
  for (int i = 0; i < 100 && cont.find("\r\n\r\n") == std::string::npos; ++i)
    cont += read_reply(fe, 20);
  EXPECT_EQ(cont, "HTTP/1.1 100 Continue\r\n\r\n");
  send_all(fe, "xyz");
  EXPECT_EQ(status_of(read_reply(fe, 2000, 1)), 200);
  ::close(fe);
}

TEST_F(FrontTest, RangeIsIgnoredAndPipelinedRequestsAnswerInOrder) {
  start(HttpLimits{});
  std::string r = roundtrip(port_, "GET /big HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n");
  EXPECT_EQ(status_of(r), 200);
  EXPECT_NE(r.find("Content-Length: 100000"), std::string::npos);
  r = roundtrip(port_, "GET /big HTTP/1.1\r\nRange: junk\r\n\r\n");
  EXPECT_EQ(status_of(r), 200);

  const int fd = connect_to(port_);
  send_all(fd,
           "POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\none"
           "GET /health HTTP/1.1\r\n\r\n"
           "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nthree\r\n0\r\n\r\n");
  r = read_reply(fd, 3000, 3);
  ::close(fd);
  const size_t a = r.find("3:one"), b = r.find("\r\n\r\nok"), c = r.find("5:three");
  ASSERT_NE(a, std::string::npos) << r;
  ASSERT_NE(b, std::string::npos) << r;
  ASSERT_NE(c, std::string::npos) << r;
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
}

TEST_F(FrontTest, HandlerSeesTheClientHangUp) {
  start(HttpLimits{});
  const int fd = connect_to(port_);
  send_all(fd, "GET /wait HTTP/1.1\r\n\r\n");
  for (int i = 0; i < 200 && !waiting_; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(waiting_);
  const auto t0 = Clock::now();
  ::close(fd);
  for (int i = 0; i < 200 && !saw_disconnect_; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_TRUE(saw_disconnect_);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(1));
}

// 500 slowloris connections (a byte at a time, never finishing their heads) and 64 idle ones
// neither block /health nor outlive their deadlines.
TEST_F(FrontTest, SlowClientsDoNotStarveOthers) {
  HttpLimits lim;
  lim.header_timeout_ms = 1500;
  lim.idle_timeout_ms = 1000;
  lim.workers = 4;
  start(lim);
  std::vector<int> slow;
  for (int i = 0; i < 500; ++i) {
    const int fd = connect_to(port_);
    ASSERT_GE(fd, 0);
    send_all(fd, "GET /health HTTP/1.1\r\nX-Slow: ");
    slow.push_back(fd);
  }
  std::vector<int> idle;
  for (int i = 0; i < 64; ++i) idle.push_back(connect_to(port_));
  const auto t_start = Clock::now();
  double worst_ms = 0;
  for (int round = 0; round < 8; ++round) {
    for (int fd : slow) send_all(fd, "a");  // one more byte each
    const auto t0 = Clock::now();
    const std::string r = roundtrip(port_, "GET /health HTTP/1.1\r\n\r\n", 1000);
    worst_ms =
        std::max(worst_ms, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    EXPECT_EQ(status_of(r), 200) << "round " << round;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_LT(worst_ms, 1000.0);
  // Past the head deadline every slow client has had 408 and a close.
  std::this_thread::sleep_until(t_start + std::chrono::milliseconds(2200));
  int timed_out = 0;
  for (int fd : slow) {
    const std::string r = read_reply(fd, 500);
    timed_out += status_of(r) == 408;
    ::close(fd);
  }
  EXPECT_EQ(timed_out, 500);
  int closed = 0;
  for (int fd : idle) {
    char c;
    closed += ::recv(fd, &c, 1, MSG_DONTWAIT) == 0;
    ::close(fd);
  }
  EXPECT_EQ(closed, 64);
}

TEST_F(FrontTest, ConnectionCapEvictsTheOldestWaiting) {
  HttpLimits lim;
  lim.max_connections = 32;
  start(lim);
  std::vector<int> fds;
  for (int i = 0; i < 100; ++i) {
    fds.push_back(connect_to(port_));
    send_all(fds.back(), "GET /health HTTP/1.1\r\n");
  }
  EXPECT_EQ(status_of(roundtrip(port_, "GET /health HTTP/1.1\r\n\r\n")), 200);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_LE(front_->open_connections(), 32u);
  for (int fd : fds) ::close(fd);
}

TEST_F(FrontTest, BufferedBytesOfAllConnectionsAreBounded) {
  HttpLimits lim;
  lim.max_buffered_bytes = 1500;  // bodies are at most 1000 (start() sets it)
  start(lim);
  const int a = connect_to(port_);
  send_all(a, "POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + std::string(900, 'a'));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const int b = connect_to(port_);
  send_all(b, "POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + std::string(900, 'b'));
  EXPECT_EQ(status_of(read_reply(b, 2000, 1)), 503);
  ::close(b);
  send_all(a, std::string(100, 'a'));  // the first one completes
  const std::string r = read_reply(a, 2000, 1);
  EXPECT_EQ(status_of(r), 200);
  EXPECT_NE(r.find("1000:aaaa"), std::string::npos);
  ::close(a);
  // Nothing stays counted: the next large request is read.
  EXPECT_EQ(status_of(roundtrip(port_, "POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" +
                                           std::string(1000, 'c'))),
            200);
}

}  // namespace
}  // namespace redknot::server
