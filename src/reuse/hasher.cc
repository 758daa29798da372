#include "reuse/hasher.h"

#include <xxhash.h>

#include "core/error.h"

namespace redknot {

Hasher::Hasher() : st_(XXH3_createState()) {
  if (st_ == nullptr) throw Error("xxhash: out of memory");
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(st_));
}

Hasher::~Hasher() { XXH3_freeState(static_cast<XXH3_state_t*>(st_)); }

void Hasher::bytes(const void* p, size_t n) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(st_), p, n);
}

uint64_t Hasher::digest() const { return XXH3_64bits_digest(static_cast<XXH3_state_t*>(st_)); }

}  // namespace redknot
