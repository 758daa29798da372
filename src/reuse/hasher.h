// Streaming 64-bit content hash (XXH3): chunk-store segment keys and spill checksums, and any
// other place that needs a stable digest of bytes. The xxhash header stays inside hasher.cc.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace redknot {

class Hasher {
 public:
  Hasher();
  ~Hasher();
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;
  void bytes(const void* p, size_t n);
  template <typename T>
  void pod(const T& v) {
    bytes(&v, sizeof(v));
  }
  // Length-prefixed, so "ab" + "c" and "a" + "bc" differ.
  void str(const std::string& s) {
    pod(static_cast<uint64_t>(s.size()));
    bytes(s.data(), s.size());
  }
  uint64_t digest() const;

 private:
  void* st_;  // XXH3_state_t
};

}  // namespace redknot
