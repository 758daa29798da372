// Loading a model checkpoint from disk into a format-independent form: the config, and host
// tensors under Hugging Face names (views into memory-mapped files where no conversion is needed).
#pragma once
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/model_config.h"
#include "core/tensor.h"

namespace redknot {

// Vocabulary embedded in a GGUF file (tokenizer.ggml.*), enough to build a tokenizer.
struct GgufVocab {
  std::string model;  // "llama" (SentencePiece) or "gpt2" (byte-level BPE)
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> token_types;  // 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte
  std::vector<std::string> merges;
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;
  bool add_bos = true;
  bool add_space_prefix = true;
};

// One rank's share of a tensor-parallel model (loader/shard_checkpoint.h). size 1: unsharded.
struct TpShard {
  int32_t rank = 0, size = 1;
  int64_t q_head0 = 0;   // first global query head this rank holds
  int64_t kv_head0 = 0;  // first global kv head (replicated heads: the one its queries read)
  int64_t ffn0 = 0;      // first FFN column (gate/up row, down_proj column)
  // Vocab-parallel embedding and lm_head: rows [vocab0, vocab0 + vocab_rows) of the vocab, held
  // as vocab_slice rows (equal on every rank, zero-padded) so the logits gather in equal parts.
  int64_t vocab0 = 0, vocab_rows = 0, vocab_slice = 0;
  ModelConfig global;  // the unsharded model's config (ranks hold config with their own counts)
};

struct Checkpoint {
  std::string path;  // what was opened (directory or file)
  ModelConfig config;
  // HF names: model.embed_tokens.weight, model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias},
  // model.layers.N.self_attn.{q,k}_norm.weight, model.layers.N.mlp.{gate,up,down}_proj.weight,
  // model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight.
  // Q/K projections are in HF's rotate-half row order whatever the file format.
  std::map<std::string, Tensor> tensors;
  std::optional<GgufVocab> gguf_vocab;
  std::string tokenizer_json_path;  // HF dir: tokenizer.json if present
  // Linear projections in FP8 (loader/fp8_checkpoint.h): "" (as stored in float), "fp8-channel"
  // or "fp8-block128"; the scales are tensors "<proj>.weight_scale".
  std::string weight_quant;
  // Set by permute_kv_heads: [layer][new position] -> the file's kv head. Empty: file order.
  std::vector<std::vector<int32_t>> kv_head_perm;
  // Set by shard_checkpoint: `config` then counts this rank's heads and FFN columns (vocab_size
  // stays the model's), and the embedding holds the rank's vocab slice plus one zero row.
  TpShard tp;

  // Throws Error "<path>: missing tensor <name>" when absent.
  const Tensor& get(const std::string& name) const;
  bool has(const std::string& name) const { return tensors.count(name) != 0; }
};

// Opens a HF directory (config.json + model.safetensors or model.safetensors.index.json) or a
// .gguf file. Every failure is an Error naming the file and the problem.
Checkpoint load_checkpoint(const std::string& path);

}  // namespace redknot
