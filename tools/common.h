// Shared plumbing of the `redknot` subcommands: opening a model on a backend, finding its
// tokenizer, parsing id lists.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "loader/checkpoint.h"
#include "model/model.h"
#include "model/sparse_ffn.h"
#include "tokenizer/tokenizer.h"

namespace CLI {
class App;
}

namespace redknot::cli {

struct LoadedModel {
  Checkpoint ckpt;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the checkpoint carries none
};

// Opens `path` (HF dir or GGUF) on backend `backend_name` ("cpu", "reference", "cuda").
LoadedModel load_model(const std::string& path, const std::string& backend_name);

// A tokenizer from a model dir (tokenizer.json inside), a GGUF file (embedded vocab) or a
// tokenizer.json path. Returns null when the model has none.
std::unique_ptr<Tokenizer> load_tokenizer_for(const std::string& path, const Checkpoint* ckpt);

// "1,2, 3" -> {1, 2, 3}; throws Error on anything else.
std::vector<int32_t> parse_id_list(const std::string& text);

// Reads all of stdin.
std::string read_stdin();

// Prompt tokens per forward pass when the user gives none (0): 512 on the CPU (latency between
// chunks stays low, the matmuls are already efficient), 4096 on CUDA (fewer launches and host
// round trips; H200: 32K TTFT 1502 ms in chunks of 4096 vs 1572 ms whole, docs/benchmarks.md).
int32_t default_prefill_chunk(const std::string& backend);

// The Sparse FFN tier options (--dense-until, --mass, --deep-start, --mass-deep, --recent-n) of
// every command that runs redknot reuse, bound to `cfg`.
void add_sparse_ffn_options(CLI::App* c, SparseFfnConfig* cfg);

}  // namespace redknot::cli
