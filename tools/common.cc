#include "common.h"

#include <CLI/CLI.hpp>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <sstream>

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

LoadedModel load_model(const std::string& path, const std::string& backend_name) {
  register_builtin_backends();
  LoadedModel m;
  m.ckpt = load_checkpoint(path);
  m.backend = create_backend(backend_name);
  m.model = std::make_unique<Model>(m.ckpt, *m.backend);
  m.tokenizer = load_tokenizer_for(path, &m.ckpt);
  return m;
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

void add_sparse_ffn_options(CLI::App* c, SparseFfnConfig* cfg) {
  c->add_option("--dense-until", cfg->dense_until, "Sparse FFN: layers below run the FFN densely")
      ->check(CLI::Range(0, 1 << 16));
  c->add_option("--mass", cfg->mass, "Sparse FFN: share of token importance kept")
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--deep-start", cfg->deep_start,
                "Sparse FFN: first layer that keeps --mass-deep instead (-1: none)")
      ->check(CLI::Range(-1, 1 << 16));
  c->add_option("--mass-deep", cfg->mass_deep, "Sparse FFN: importance kept from --deep-start on")
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--recent-n", cfg->recent_n, "Sparse FFN: last tokens that always run the FFN")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option("--layer-mass", cfg->layer_mass,
                "Sparse FFN: one mass per layer from layer 0, comma separated (>= 1: dense); "
                "overrides the tiers for the layers it names")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1e9));
  c->add_option("--ffn-dilate", cfg->dilate,
                "Sparse FFN: also run the rows within this distance of a top-mass row")
      ->check(CLI::Range(0, 1 << 16));
}

}  // namespace redknot::cli
