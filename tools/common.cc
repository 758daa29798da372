#include "common.h"

#include <CLI/CLI.hpp>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <sstream>
#include <type_traits>

#include "backend/builtin.h"
#include "core/error.h"

namespace redknot::cli {

namespace fs = std::filesystem;

std::unique_ptr<Tokenizer> load_tokenizer_for(const std::string& path, const Checkpoint* ckpt) {
  if (fs::is_regular_file(path) && fs::path(path).extension() == ".json")
    return Tokenizer::from_hf_file(path);
  if (fs::is_directory(path)) {
    fs::path tj = fs::path(path) / "tokenizer.json";
    if (fs::exists(tj)) return Tokenizer::from_hf_file(tj.string());
    return nullptr;
  }
  if (ckpt && ckpt->gguf_vocab) return Tokenizer::from_gguf(*ckpt->gguf_vocab);
  if (!ckpt) {
    Checkpoint c = load_checkpoint(path);
    if (c.gguf_vocab) return Tokenizer::from_gguf(*c.gguf_vocab);
  }
  return nullptr;
}

LoadedModel load_model(const std::string& path, const EngineOptions& opts) {
  LoadedModel m;
  static_cast<LoadedEngineModel&>(m) =
      open_engine_model(path, opts);  // the model keeps no ckpt ref
  m.tokenizer = load_tokenizer_for(path, &m.ckpt);
  return m;
}

LoadedModel load_model(const std::string& path, const std::string& backend_name) {
  EngineOptions opts;
  opts.backend = backend_name;
  return load_model(path, opts);
}

std::vector<int32_t> parse_id_list(const std::string& text) {
  std::vector<int32_t> ids;
  std::string item;
  std::stringstream ss(text);
  while (std::getline(ss, item, ',')) {
    size_t b = item.find_first_not_of(" \t\n"), e = item.find_last_not_of(" \t\n");
    if (b == std::string::npos) throw Error("empty entry in id list '" + text + "'");
    item = item.substr(b, e - b + 1);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || v < 0 || v > INT32_MAX)
      throw Error("'" + item + "' is not a token id");
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) throw Error("empty id list");
  return ids;
}

std::string read_stdin() {
  return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
}

int32_t default_prefill_chunk(const std::string& backend) { return backend == "cuda" ? 4096 : 512; }

void add_precision_options(CLI::App* c, std::string* quantization, std::string* kv_cache_dtype) {
  c->add_option("--quantization", *quantization,
                "none | fp8: quantize the linear projections to FP8 e4m3 at load time "
                "(per-channel scales); FP8 checkpoints load as FP8 either way");
  c->add_option("--kv-cache-dtype", *kv_cache_dtype,
                "auto (the backend's act dtype) | fp8 (e4m3 K/V rows, one scale per token and "
                "head)");
}

void add_tensor_parallel_option(CLI::App* c, int32_t* size) {
  c->add_option("--tensor-parallel-size", *size,
                "ranks to shard the model over (Megatron-style; CPU: threads of this process, "
                "CUDA: needs NCCL and a GPU per rank)")
      ->check(CLI::Range(1, 64));
}

void refuse_tensor_parallel(const std::string& command, int32_t size) {
  if (size > 1)
    throw Error(command + " --tensor-parallel-size " + std::to_string(size) +
                ": not supported yet (its loop drives one model; `generate` and `serve` run tensor "
                "parallel, docs/tensor-parallel.md)");
}

void add_reuse_settings_options(CLI::App* c, ReuseSettings* s) {
  // Each flag fills its optional field only when given, so the model directory's settings
  // keep every field the command line leaves alone.
  auto set = [c, s](const char* name, auto field, const char* help) {
    using T = typename std::remove_reference_t<decltype(s->*field)>::value_type;
    return c->add_option_function<T>(
        name, [s, field](const T& v) { s->*field = v; }, help);
  };
  set("--head-profile", &ReuseSettings::head_profile,
      "head profile JSON (default: the model directory's reuse_settings.json, else the model's "
      "own attention)");
  set("--sparse-ffn", &ReuseSettings::sparse_ffn,
      "redknot mode runs the FFN only for important tokens (true | false)");
  c->add_flag_callback(
      "--no-sparse-ffn", [s] { s->sparse_ffn = false; }, "redknot mode without Sparse FFN");
  set("--dense-until", &ReuseSettings::dense_until, "Sparse FFN: layers below run the FFN densely")
      ->check(CLI::Range(0, 1 << 16));
  set("--mass", &ReuseSettings::mass, "Sparse FFN: share of token importance kept")
      ->check(CLI::Range(0.0, 1.0));
  set("--deep-start", &ReuseSettings::deep_start,
      "Sparse FFN: first layer that keeps --mass-deep instead (-1: none)")
      ->check(CLI::Range(-1, 1 << 16));
  set("--mass-deep", &ReuseSettings::mass_deep, "Sparse FFN: importance kept from --deep-start on")
      ->check(CLI::Range(0.0, 1.0));
  set("--recent-n", &ReuseSettings::recent_n, "Sparse FFN: last tokens that always run the FFN")
      ->check(CLI::Range(0, 1 << 20));
  set("--layer-mass", &ReuseSettings::layer_mass,
      "Sparse FFN: one mass per layer from layer 0, comma separated (>= 1: dense); overrides "
      "the tiers for the layers it names")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1e9));
  set("--ffn-dilate", &ReuseSettings::ffn_dilate,
      "Sparse FFN: also run the rows within this distance of a top-mass row")
      ->check(CLI::Range(0, 1 << 16));
  set("--reuse-chunk", &ReuseSettings::reuse_chunk,
      "rows per forward of every reuse pass (0: each pass whole; serve runs one per step); "
      "Sparse FFN ranks rows per forward, so eval, generate and serve answer alike with the same "
      "value")
      ->check(CLI::Range(0, 1 << 20));
}

void add_reuse_pass_options(CLI::App* c, ReuseSettings* s) {
  c->add_option_function<bool>(
      "--skip-dead-rows", [s](const bool& v) { s->skip_dead_rows = v; },
      "redknot mode skips rows no later token reads past the last global layer (exact; true | "
      "false)");
  c->add_option_function<bool>(
      "--query-full-attention", [s](const bool& v) { s->query_full_attention = v; },
      "redknot mode: the query's rows attend with every head global, local heads over the whole "
      "prompt (beyond the paper; true | false)");
}

ReuseSettings resolve_reuse_settings(const std::string& model_path, const ReuseSettings& given) {
  ReuseSettings flags = given;
  if (!flags.empty()) flags.source = "command line";
  return model_reuse_settings(model_path).overlay(flags);
}

nlohmann::json reuse_settings_json(const ReuseSettings& s, const ReuseOptions& o) {
  const SparseFfnConfig& f = o.sparse_ffn;
  nlohmann::json j = {{"source", s.source.empty() ? "defaults" : s.source},
                      {"redknot", s.redknot_disabled ? "disabled" : "enabled"},
                      {"head_profile", s.head_profile.value_or("")},
                      {"sparse_ffn", o.sparse_ffn_enabled},
                      {"dense_until", f.dense_until},
                      {"mass", f.mass},
                      {"deep_start", f.deep_start},
                      {"mass_deep", f.mass_deep},
                      {"recent_n", f.recent_n},
                      {"layer_mass", f.layer_mass},
                      {"ffn_dilate", f.dilate},
                      {"skip_dead_rows", o.skip_dead_rows},
                      {"query_full_attention", o.query_full_attention},
                      {"reuse_chunk", o.chunk}};
  if (s.redknot_disabled) j["redknot_disabled_reason"] = *s.redknot_disabled;
  if (s.calibration) j["calibration"] = *s.calibration;
  return j;
}

}  // namespace redknot::cli
