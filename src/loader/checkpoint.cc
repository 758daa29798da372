#include "loader/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
#include "core/error.h"

#include "loader/fp8_checkpoint.h"
#include "loader/gguf.h"
#include "loader/hf_config.h"
#include "loader/safetensors.h"
#include "loader/tensor_check.h"

namespace redknot {

const Tensor& Checkpoint::get(const std::string& name) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw Error(path + ": missing tensor '" + name + "'");
  return it->second;
}

namespace {

Checkpoint load_hf_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path config = fs::path(dir) / "config.json";
  std::error_code ec;
  if (!fs::exists(config, ec)) throw Error(dir + ": no config.json in the model directory");
  Checkpoint ck;
  ck.path = dir;
  ck.config = read_hf_config(config.string());
  ck.tensors = read_safetensors_dir(dir);
  {
    std::ifstream in(config);
    const nlohmann::json cfg = nlohmann::json::parse(in, nullptr, false);
    if (cfg.is_discarded()) throw Error(config.string() + ": invalid JSON");
    ck.weight_quant = normalize_fp8_checkpoint(cfg, ck.tensors, dir);
  }
  const fs::path tok = fs::path(dir) / "tokenizer.json";
  if (fs::exists(tok, ec)) ck.tokenizer_json_path = tok.string();
  // Tied models may still ship an lm_head copy; keep it (the model code decides).
  check_checkpoint_tensors(ck.config, ck.tensors, dir);
  return ck;
}

bool has_gguf_magic(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

}  // namespace

Checkpoint load_checkpoint(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw Error(path + ": no such file or directory");
  if (fs::is_directory(st)) return load_hf_dir(path);
  if (path.ends_with(".gguf") || has_gguf_magic(path)) return load_gguf_checkpoint(path);
  if (path.ends_with(".safetensors") || fs::path(path).filename() == "config.json")
    return load_hf_dir(fs::path(path).parent_path().string());
  throw Error(path + ": not a model directory (config.json + safetensors) or a .gguf file");
}

}  // namespace redknot
