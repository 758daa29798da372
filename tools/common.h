// Shared plumbing of the `redknot` subcommands: opening a model on a backend, finding its
// tokenizer, parsing id lists.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "engine/engine_setup.h"
#include "engine/reuse_settings.h"
#include "loader/checkpoint.h"
#include "model/model.h"
#include "model/sparse_ffn.h"
#include "reuse/reuse_prefill.h"
#include "tokenizer/tokenizer.h"

namespace CLI {
class App;
}

namespace redknot::cli {

struct LoadedModel : LoadedEngineModel {
  std::unique_ptr<Tokenizer> tokenizer;  // null when the checkpoint carries none
};

// Opens `path` (HF dir or GGUF) through the engine assembly (engine/engine_setup.h): backend
// `opts.backend` ("cpu", "reference", "cuda"), batch-invariant when asked, and its tokenizer.
LoadedModel load_model(const std::string& path, const EngineOptions& opts);
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

// The model's reuse settings as flags, the same in every command that runs reuse (serve,
// generate, eval): --head-profile, --sparse-ffn true|false / --no-sparse-ffn and the Sparse FFN
// tiers (--dense-until, --mass, --deep-start, --mass-deep, --recent-n, --layer-mass,
// --ffn-dilate). Each flag given sets its field of `given`.
void add_reuse_settings_options(CLI::App* c, ReuseSettings* given);
// Precision of weights and KV (serve, generate, eval): --quantization none|fp8 and
// --kv-cache-dtype auto|fp8 (values are checked where the engine is assembled).
void add_precision_options(CLI::App* c, std::string* quantization, std::string* kv_cache_dtype);
// --tensor-parallel-size N (generate and serve run it; eval refuses N > 1 until its loop runs
// per rank: refuse_tensor_parallel).
void add_tensor_parallel_option(CLI::App* c, int32_t* size);
void refuse_tensor_parallel(const std::string& command, int32_t size);
// redknot mode's pass options as value flags (serve, generate): --skip-dead-rows true|false,
// --query-full-attention true|false.
void add_reuse_pass_options(CLI::App* c, ReuseSettings* given);
// What a command runs with: the model directory's reuse_settings.json, overridden field by field
// by the flags given.
ReuseSettings resolve_reuse_settings(const std::string& model_path, const ReuseSettings& given);
// The resolved settings as JSON (--print-config of serve and generate).
nlohmann::json reuse_settings_json(const ReuseSettings& s, const ReuseOptions& applied);

}  // namespace redknot::cli
