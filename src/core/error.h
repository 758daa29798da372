// One exception type for every user-facing failure: the message names the file/input and the
// problem.
#pragma once
#include <stdexcept>
#include <string>

namespace redknot {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Raised when the KV pool cannot hold a request; the scheduler catches it and queues/preempts.
class OutOfKvMemory : public Error {
 public:
  explicit OutOfKvMemory(const std::string& msg) : Error(msg) {}
};

#define RK_CHECK(cond, msg)                                                                   \
  do {                                                                                        \
    if (!(cond))                                                                              \
      throw ::redknot::Error(std::string("internal check failed: ") + #cond + " — " + (msg)); \
  } while (0)

}  // namespace redknot
