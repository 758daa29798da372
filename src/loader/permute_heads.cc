#include "loader/permute_heads.h"

#include <cstring>

#include "core/error.h"

namespace redknot {

namespace {

std::string layer_name(int64_t l, const std::string& rest) {
  return "model.layers." + std::to_string(l) + "." + rest;
}

// Block b of the output holds block src[b] of the input. A block is `block_rows` rows of a
// [rows, cols] tensor (or of a 1-D tensor: cols = 1).
Tensor permute_row_blocks(const Tensor& t, const std::vector<int64_t>& src, int64_t block_rows,
                          const std::string& name) {
  const int64_t rows = t.dim(0), cols = t.rank() == 2 ? t.dim(1) : 1;
  if (t.rank() > 2 || rows != static_cast<int64_t>(src.size()) * block_rows)
    throw Error(name + ": shape " + shape_str(t.shape()) + " does not match the head count");
  const int64_t block_bytes = dtype_bytes(t.dtype(), cols) * block_rows;
  Tensor out = Tensor::host(t.dtype(), t.shape());
  const auto* in = static_cast<const char*>(t.raw());
  auto* dst = static_cast<char*>(out.raw());
  for (size_t b = 0; b < src.size(); ++b)
    std::memcpy(dst + b * block_bytes, in + src[b] * block_bytes, block_bytes);
  return out;
}

// Column block b of each row of t ([rows, cols]) is column block src[b] of the input.
Tensor permute_col_blocks(const Tensor& t, const std::vector<int64_t>& src, int64_t block_cols,
                          const std::string& name) {
  if (t.rank() != 2 || t.dim(1) != static_cast<int64_t>(src.size()) * block_cols)
    throw Error(name + ": shape " + shape_str(t.shape()) + " does not match the head count");
  const int64_t row_bytes = dtype_bytes(t.dtype(), t.dim(1));
  const int64_t block_bytes = dtype_bytes(t.dtype(), block_cols);
  // Quantized blocks must not straddle a head boundary.
  if (block_bytes * static_cast<int64_t>(src.size()) != row_bytes)
    throw Error(name + ": " + dtype_name(t.dtype()) + " cannot be split at head_dim columns");
  Tensor out = Tensor::host(t.dtype(), t.shape());
  const auto* in = static_cast<const char*>(t.raw());
  auto* dst = static_cast<char*>(out.raw());
  for (int64_t r = 0; r < t.dim(0); ++r)
    for (size_t b = 0; b < src.size(); ++b)
      std::memcpy(dst + r * row_bytes + b * block_bytes, in + r * row_bytes + src[b] * block_bytes,
                  block_bytes);
  return out;
}

}  // namespace

void permute_kv_heads(Checkpoint& ckpt, const std::vector<std::vector<int32_t>>& perm) {
  const ModelConfig& c = ckpt.config;
  const int64_t L = c.num_layers, H = c.num_kv_heads, hd = c.head_dim;
  if (static_cast<int64_t>(perm.size()) != L)
    throw Error(ckpt.path + ": head permutation has " + std::to_string(perm.size()) +
                " layers, the model " + std::to_string(L));
  if (H <= 0 || c.num_heads % H != 0) throw Error(ckpt.path + ": heads not divisible by kv heads");
  // FP8 scales would have to move with their rows (and 128-row blocks straddle heads).
  if (!ckpt.weight_quant.empty())
    throw Error(ckpt.path + ": head placement of FP8 weights (" + ckpt.weight_quant +
                ") is not supported; use a profile without placement");
  const int64_t group = c.num_heads / H;
  std::vector<std::vector<int32_t>> composed;
  for (int64_t l = 0; l < L; ++l) {
    if (static_cast<int64_t>(perm[l].size()) != H)
      throw Error(ckpt.path + ": head permutation layer " + std::to_string(l) + " needs " +
                  std::to_string(H) + " heads");
    std::vector<bool> seen(H, false);
    std::vector<int64_t> kv_src, q_src;  // new block -> old block
    for (int32_t old : perm[l]) {
      if (old < 0 || old >= H || seen[old])
        throw Error(ckpt.path + ": head permutation layer " + std::to_string(l) +
                    " is not a permutation");
      seen[old] = true;
      kv_src.push_back(old);
      for (int64_t j = 0; j < group; ++j) q_src.push_back(old * group + j);
    }
    auto rows = [&](const std::string& name, const std::vector<int64_t>& src) {
      const std::string n = layer_name(l, name);
      if (ckpt.has(n)) ckpt.tensors[n] = permute_row_blocks(ckpt.get(n), src, hd, n);
    };
    for (const char* p : {"q_proj.weight", "q_proj.bias"})
      rows(std::string("self_attn.") + p, q_src);
    for (const char* p : {"k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"})
      rows(std::string("self_attn.") + p, kv_src);
    const std::string o = layer_name(l, "self_attn.o_proj.weight");
    ckpt.tensors[o] = permute_col_blocks(ckpt.get(o), q_src, hd, o);
    std::vector<int32_t> row;
    for (int32_t old : perm[l])
      row.push_back(ckpt.kv_head_perm.empty() ? old : ckpt.kv_head_perm[l][old]);
    composed.push_back(std::move(row));
  }
  ckpt.kv_head_perm = std::move(composed);
}

}  // namespace redknot
