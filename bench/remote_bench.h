// `redknot bench chunk-store-remote`: a document's time to first token when its KV is a local
// chunk-store hit, a remote (Redis) hit fetched by a second store, or recomputed, and the bytes
// the remote hit moved (head-major: global heads whole, local heads' sink + window blocks)
// against a token-major transfer of the same KV (every head's every row).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace redknot::bench {

struct RemoteBenchArgs {
  std::string shape = "rag-7m";  // preset_config name (random weights)
  int32_t layers = 0;            // override the preset's layers (0: keep)
  std::string redis;             // URL; empty: start a private redis-server on a Unix socket
  std::vector<int64_t> tokens = {4096, 32768};
  double global_fraction = 0.15;
  int32_t window = 512, sink = 4;
  int32_t block_rows = 64;
  int32_t query_tokens = 16;
  int32_t repeats = 1;
};

int run_remote_bench(const RemoteBenchArgs& a);

}  // namespace redknot::bench
