#include "loader/shard_checkpoint.h"

#include <cstring>

#include "core/error.h"

namespace redknot {

namespace {

std::string layer_name(int64_t l, const std::string& rest) {
  return "model.layers." + std::to_string(l) + "." + rest;
}

// Rows [r0, r0 + n) of t ([rows, cols] or 1-D), as `out_rows` rows: the rest zero (padding).
Tensor slice_rows(const Tensor& t, int64_t r0, int64_t n, int64_t out_rows,
                  const std::string& name) {
  const int64_t rows = t.dim(0), cols = t.rank() == 2 ? t.dim(1) : 1;
  if (t.rank() > 2 || r0 < 0 || n < 0 || r0 + n > rows || n > out_rows)
    throw Error(name + ": cannot take rows [" + std::to_string(r0) + ", " + std::to_string(r0 + n) +
                ") of " + t.describe());
  std::vector<int64_t> shape = t.shape();
  shape[0] = out_rows;
  Tensor out = Tensor::host(t.dtype(), shape);  // zero-filled: the padding rows
  const int64_t row_bytes = dtype_bytes(t.dtype(), cols);
  std::memcpy(out.raw(), static_cast<const char*>(t.raw()) + r0 * row_bytes,
              static_cast<size_t>(n * row_bytes));
  return out;
}

// Columns [c0, c0 + n) of each row of t ([rows, cols]).
Tensor slice_cols(const Tensor& t, int64_t c0, int64_t n, const std::string& name) {
  if (t.rank() != 2 || c0 < 0 || n <= 0 || c0 + n > t.dim(1))
    throw Error(name + ": cannot take columns [" + std::to_string(c0) + ", " +
                std::to_string(c0 + n) + ") of " + t.describe());
  if (t.dtype() == DType::Q8_0 && (c0 % kQ8Block != 0 || n % kQ8Block != 0))
    throw Error(name + ": Q8_0 blocks of 32 columns cannot be cut at column " +
                std::to_string(c0 % kQ8Block != 0 ? c0 : c0 + n));
  const int64_t row_bytes = dtype_bytes(t.dtype(), t.dim(1));
  const int64_t off = dtype_bytes(t.dtype(), c0), bytes = dtype_bytes(t.dtype(), n);
  Tensor out = Tensor::host(t.dtype(), {t.dim(0), n});
  const auto* in = static_cast<const char*>(t.raw());
  auto* dst = static_cast<char*>(out.raw());
  for (int64_t r = 0; r < t.dim(0); ++r)
    std::memcpy(dst + r * bytes, in + r * row_bytes + off, static_cast<size_t>(bytes));
  return out;
}

}  // namespace

TpShard plan_tp_shard(const ModelConfig& cfg, int rank, int size) {
  if (size < 1) throw Error("tensor parallel size must be >= 1 (got " + std::to_string(size) + ")");
  if (rank < 0 || rank >= size)
    throw Error("tensor parallel rank " + std::to_string(rank) + " outside [0, " +
                std::to_string(size) + ")");
  const int64_t nh = cfg.num_heads, nkv = cfg.num_kv_heads, R = size;
  if (nh % R != 0)
    throw Error("tensor parallel size " + std::to_string(size) + " does not divide the " +
                std::to_string(nh) + " query heads");
  if (nkv >= R ? nkv % R != 0 : R % nkv != 0)
    throw Error("tensor parallel size " + std::to_string(size) + " must divide the " +
                std::to_string(nkv) + " kv heads or be a multiple of them");
  if (cfg.intermediate_size < R)
    throw Error("tensor parallel size " + std::to_string(size) + " exceeds the FFN width");
  TpShard s;
  s.rank = rank;
  s.size = size;
  s.global = cfg;
  s.q_head0 = rank * (nh / R);
  // nkv < R: the rank's nh/R query heads all read one kv head (R/nkv ranks share it).
  s.kv_head0 = nkv >= R ? rank * (nkv / R) : s.q_head0 / (nh / nkv);
  s.ffn0 = rank * cfg.intermediate_size / R;  // floor split: widths differ by at most one
  s.vocab_slice = (cfg.vocab_size + R - 1) / R;
  s.vocab0 = rank * s.vocab_slice;
  s.vocab_rows = std::max<int64_t>(0, std::min(s.vocab_slice, cfg.vocab_size - s.vocab0));
  return s;
}

Checkpoint shard_checkpoint(const Checkpoint& full, int rank, int size) {
  const ModelConfig& g = full.config;
  TpShard s = plan_tp_shard(g, rank, size);
  if (size == 1) {
    Checkpoint c = full;
    c.tp = s;
    return c;
  }
  if (!full.weight_quant.empty())
    throw Error(full.path + ": tensor parallelism over FP8 weights (" + full.weight_quant +
                ") is not supported yet (their scales are not sliced)");
  const int64_t hd = g.head_dim, R = size;
  const int64_t nq = g.num_heads / R, nkv = g.num_kv_heads >= R ? g.num_kv_heads / R : 1;
  const int64_t ffn_end = (rank + 1) * g.intermediate_size / R, nf = ffn_end - s.ffn0;
  Checkpoint c;
  c.path = full.path;
  c.gguf_vocab = full.gguf_vocab;
  c.tokenizer_json_path = full.tokenizer_json_path;
  c.kv_head_perm = full.kv_head_perm;
  c.tp = s;
  c.config = g;
  c.config.num_heads = nq;
  c.config.num_kv_heads = nkv;
  c.config.intermediate_size = nf;
  c.config.tie_word_embeddings = false;  // the lm_head slice is written out below
  auto put = [&](const std::string& name, Tensor t) { c.tensors[name] = std::move(t); };
  const std::string embed = "model.embed_tokens.weight";
  put(embed, slice_rows(full.get(embed), s.vocab0, s.vocab_rows, s.vocab_slice + 1, embed));
  const std::string head = full.has("lm_head.weight") ? "lm_head.weight" : embed;
  put("lm_head.weight", slice_rows(full.get(head), s.vocab0, s.vocab_rows, s.vocab_slice, head));
  put("model.norm.weight", full.get("model.norm.weight"));
  for (int64_t l = 0; l < g.num_layers; ++l) {
    auto rows = [&](const std::string& rest, int64_t r0, int64_t n) {
      const std::string name = layer_name(l, rest);
      put(name, slice_rows(full.get(name), r0, n, n, name));
    };
    auto cols = [&](const std::string& rest, int64_t c0, int64_t n) {
      const std::string name = layer_name(l, rest);
      put(name, slice_cols(full.get(name), c0, n, name));
    };
    auto whole = [&](const std::string& rest) {
      const std::string name = layer_name(l, rest);
      put(name, full.get(name));
    };
    whole("input_layernorm.weight");
    whole("post_attention_layernorm.weight");
    rows("self_attn.q_proj.weight", s.q_head0 * hd, nq * hd);
    rows("self_attn.k_proj.weight", s.kv_head0 * hd, nkv * hd);
    rows("self_attn.v_proj.weight", s.kv_head0 * hd, nkv * hd);
    cols("self_attn.o_proj.weight", s.q_head0 * hd, nq * hd);
    if (g.attention_bias) {
      rows("self_attn.q_proj.bias", s.q_head0 * hd, nq * hd);
      rows("self_attn.k_proj.bias", s.kv_head0 * hd, nkv * hd);
      rows("self_attn.v_proj.bias", s.kv_head0 * hd, nkv * hd);
    }
    if (g.qk_norm) {
      for (const char* n : {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}) {
        if (full.get(layer_name(l, n)).numel() != hd)
          throw Error(full.path + ": " + layer_name(l, n) + " is not one [head_dim] vector");
        whole(n);
      }
    }
    rows("mlp.gate_proj.weight", s.ffn0, nf);
    rows("mlp.up_proj.weight", s.ffn0, nf);
    cols("mlp.down_proj.weight", s.ffn0, nf);
  }
  return c;
}

}  // namespace redknot
