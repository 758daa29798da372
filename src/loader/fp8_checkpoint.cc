#include "loader/fp8_checkpoint.h"

#include <algorithm>
#include <regex>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"

namespace redknot {
namespace {

using json = nlohmann::json;

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

Tensor host_f32(const Tensor& t) {
  Tensor out = Tensor::host(DType::F32, t.shape());
  convert_to_f32(t.dtype(), t.raw(), out.data<float>(), t.numel());
  return out;
}

// Block size of the checkpoint's scheme (0: per tensor or per channel), validating the
// quantization_config against what the loader and the FP8 GEMM implement.
int checked_block_size(const json& qc, const std::string& source) {
  const std::string method = qc.value("quant_method", "");
  auto want_128 = [&](const json& b, const char* key) {
    if (!b.is_array() || b.size() != 2 || b[0] != kFp8Block || b[1] != kFp8Block)
      throw Error(source + ": quantization_config " + key + " " + b.dump() +
                  " is not supported (FP8 weight blocks must be [128, 128])");
    return kFp8Block;
  };
  if (method == "fp8") {
    if (qc.contains("fmt") && qc["fmt"] != "e4m3")
      throw Error(source + ": quantization_config.fmt " + qc["fmt"].dump() +
                  " is not supported (FP8 weights must be e4m3)");
    if (qc.contains("weight_block_size") && !qc["weight_block_size"].is_null())
      return want_128(qc["weight_block_size"], "weight_block_size");
    return 0;
  }
  if (method == "compressed-tensors") {
    int block = 0;
    const json groups = qc.value("config_groups", json::object());
    for (const auto& [gname, g] : groups.items()) {
      const json w = g.value("weights", json::object());
      if (w.value("num_bits", 0) != 8 || w.value("type", "") != "float")
        throw Error(source + ": compressed-tensors group '" + gname + "' weights " + w.dump() +
                    " are not FP8 (num_bits 8, type float): only FP8 is supported");
      const std::string strategy = w.value("strategy", "tensor");
      if (strategy == "block")
        block = want_128(w.value("block_structure", json()), "block_structure");
      else if (strategy != "channel" && strategy != "tensor")
        throw Error(source + ": compressed-tensors weight strategy '" + strategy +
                    "' is not supported (tensor, channel, block)");
    }
    return block;
  }
  throw Error(source + ": quantization_config.quant_method '" + method +
              "' is not supported (FP8 only: 'fp8', 'compressed-tensors')");
}

}  // namespace

bool is_fp8_linear_name(const std::string& name) {
  static const std::regex re(
      R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight)");
  return std::regex_match(name, re);
}

std::string normalize_fp8_checkpoint(const json& config, std::map<std::string, Tensor>& tensors,
                                     const std::string& source) {
  std::vector<std::string> fp8;
  for (const auto& [name, t] : tensors)
    if (t.dtype() == DType::F8_E4M3) fp8.push_back(name);
  const bool has_qc =
      config.contains("quantization_config") && config["quantization_config"].is_object();
  if (!has_qc) {
    if (!fp8.empty())
      throw Error(source + ": tensor '" + fp8[0] +
                  "' is F8_E4M3 but config.json has no quantization_config");
    return kQuantNone;
  }
  const int block = checked_block_size(config["quantization_config"], source);
  bool any_block = false;
  for (const std::string& name : fp8) {
    if (!is_fp8_linear_name(name))
      throw Error(source + ": tensor '" + name +
                  "' is F8_E4M3; only the decoder's linear projections may be FP8");
    const Tensor& w = tensors.at(name);
    if (w.rank() != 2) throw Error(source + ": FP8 weight '" + name + "' must be 2-D");
    const std::string base = name.substr(0, name.size() - std::string("weight").size());
    const std::string inv = base + "weight_scale_inv", plain = base + "weight_scale";
    const bool has_inv = tensors.count(inv) != 0;
    if (!has_inv && !tensors.count(plain))
      throw Error(source + ": FP8 weight '" + name + "' has no '" + plain + "' or '" + inv + "'");
    Tensor s = host_f32(tensors.at(has_inv ? inv : plain));
    const int64_t n = w.dim(0), k = w.dim(1);
    const int64_t nb = (n + kFp8Block - 1) / kFp8Block, kb = (k + kFp8Block - 1) / kFp8Block;
    Tensor canon;
    if (block == 0 && s.numel() == 1) {  // per tensor: the same scale on every channel
      canon = Tensor::from_f32(std::vector<float>(n, s.data<float>()[0]), {n});
    } else if (block == 0 &&
               (s.shape() == std::vector<int64_t>{n} || s.shape() == std::vector<int64_t>{n, 1})) {
      canon = s.reshape({n});
    } else if (block == kFp8Block && s.shape() == std::vector<int64_t>{nb, kb}) {
      canon = s;
      any_block = true;
    } else {
      throw Error(source + ": scale of FP8 weight '" + name + "' has shape " +
                  shape_str(s.shape()) + "; expected " +
                  (block
                       ? "[" + std::to_string(nb) + ", " + std::to_string(kb) + "] (128x128 blocks)"
                       : "[] / [1] (tensor), [" + std::to_string(n) + "] or [" + std::to_string(n) +
                             ", 1] (channel)"));
    }
    tensors.erase(inv);
    tensors[plain] = canon;
    // Static activation scales are not used: activations are quantized per token (dynamic).
    tensors.erase(base + "input_scale");
  }
  for (auto it = tensors.begin(); it != tensors.end();) {
    const std::string& name = it->first;
    // KV-cache scales of compressed-tensors: the FP8 KV cache computes its own.
    if (ends_with(name, ".k_scale") || ends_with(name, ".v_scale")) {
      it = tensors.erase(it);
      continue;
    }
    if (ends_with(name, "_scale") || ends_with(name, "_scale_inv")) {
      const std::string weight = name.substr(0, name.rfind('.') + 1) + "weight";
      auto w = tensors.find(weight);
      if (w == tensors.end() || w->second.dtype() != DType::F8_E4M3)
        throw Error(source + ": scale tensor '" + name + "' belongs to no FP8 weight");
    }
    ++it;
  }
  if (fp8.empty()) return kQuantNone;
  return any_block ? kQuantFp8Block : kQuantFp8Channel;
}

void quantize_checkpoint_fp8(Checkpoint& ckpt) {
  bool any = false;
  // Rows are independent (one scale each): every host thread takes a share, so an 8B checkpoint
  // quantizes in seconds rather than minutes; the codes do not depend on the split.
  ThreadPool pool;
  for (auto& [name, t] : ckpt.tensors) {
    if (!is_fp8_linear_name(name) || t.dtype() == DType::F8_E4M3) continue;
    const int64_t n = t.dim(0), k = t.dim(1);
    Tensor codes = Tensor::host(DType::F8_E4M3, {n, k});
    Tensor scale = Tensor::host(DType::F32, {n});
    const int64_t row_bytes = dtype_bytes(t.dtype(), k);
    pool.parallel_for(n, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(k);
      for (int64_t r = begin; r < end; ++r) {
        convert_to_f32(t.dtype(), static_cast<const char*>(t.raw()) + r * row_bytes, row.data(), k);
        scale.data<float>()[r] = fp8_quantize_row(row.data(), k, codes.data<uint8_t>() + r * k);
      }
    });
    t = codes;
    ckpt.tensors[name.substr(0, name.size() - std::string("weight").size()) + "weight_scale"] =
        scale;
    any = true;
  }
  if (any && ckpt.weight_quant.empty()) ckpt.weight_quant = kQuantFp8Channel;
}

void apply_quantization(Checkpoint& ckpt, const std::string& method) {
  if (method.empty() || method == "none") return;
  if (method == "fp8") return quantize_checkpoint_fp8(ckpt);
  throw Error("--quantization '" + method + "' is not supported (none, fp8)");
}

Tensor dequantize_fp8_weight(const Tensor& codes, const Tensor& scale) {
  if (codes.dtype() != DType::F8_E4M3 || codes.rank() != 2)
    throw Error("dequantize_fp8_weight: codes must be 2-D f8_e4m3, got " + codes.describe());
  const int64_t n = codes.dim(0), k = codes.dim(1);
  const bool blocked = scale.rank() == 2;
  Tensor s = host_f32(scale);
  Tensor out = Tensor::host(DType::F32, {n, k});
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      out.data<float>()[r * k + c] =
          fp8_e4m3_to_f32(codes.data<uint8_t>()[r * k + c]) *
          (blocked ? s.data<float>()[(r / kFp8Block) * scale.dim(1) + c / kFp8Block]
                   : s.data<float>()[r]);
  return out;
}

}  // namespace redknot
