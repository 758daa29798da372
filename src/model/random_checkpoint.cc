#include "model/random_checkpoint.h"

#include <cmath>
#include <random>

#include "core/error.h"

namespace redknot {

ModelConfig preset_config(const std::string& name) {
  ModelConfig c;
  c.arch = Arch::Llama;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  if (name == "llama3-8b") {
    c.vocab_size = 128256, c.hidden_size = 4096, c.intermediate_size = 14336;
    c.num_layers = 32, c.num_heads = 32, c.num_kv_heads = 8, c.head_dim = 128;
    c.rope_theta = 500000.0, c.max_position_embeddings = 131072;
    c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 8192};
  } else if (name == "mistral-7b") {
    c.arch = Arch::Mistral;
    c.vocab_size = 32768, c.hidden_size = 4096, c.intermediate_size = 14336;
    c.num_layers = 32, c.num_heads = 32, c.num_kv_heads = 8, c.head_dim = 128;
    c.rope_theta = 1000000.0, c.max_position_embeddings = 32768;
  } else if (name == "1b") {
    c.vocab_size = 32000, c.hidden_size = 2048, c.intermediate_size = 8192;
    c.num_layers = 16, c.num_heads = 32, c.num_kv_heads = 8, c.head_dim = 64;
    c.rope_theta = 500000.0, c.max_position_embeddings = 131072;
  } else if (name == "rag-7m") {  // the shape of models/redknot-rag-8k (head_dim 32)
    c.vocab_size = 4096, c.hidden_size = 256, c.intermediate_size = 768;
    c.num_layers = 8, c.num_heads = 8, c.num_kv_heads = 2, c.head_dim = 32;
    c.rope_theta = 100000.0, c.max_position_embeddings = 8192;
    c.tie_word_embeddings = true;
  } else if (name == "tiny") {
    c.vocab_size = 512, c.hidden_size = 128, c.intermediate_size = 352;
    c.num_layers = 2, c.num_heads = 8, c.num_kv_heads = 2, c.head_dim = 16;
    c.rope_theta = 10000.0, c.max_position_embeddings = 4096;
  } else {
    throw Error("unknown model shape '" + name +
                "' (known: llama3-8b, mistral-7b, 1b, rag-7m, tiny)");
  }
  return c;
}

namespace {
Tensor random_tensor(std::vector<int64_t> shape, DType dtype, float amplitude,
                     std::mt19937_64& rng) {
  Tensor t = Tensor::host(dtype, std::move(shape));
  std::uniform_real_distribution<float> dist(-amplitude, amplitude);
  const int64_t n = t.numel();
  if (dtype == DType::F32) {
    float* p = t.data<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = dist(rng);
  } else if (dtype == DType::BF16) {
    uint16_t* p = t.data<uint16_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(dist(rng));
  } else {
    throw Error("random_checkpoint: weights must be f32 or bf16");
  }
  return t;
}

Tensor ones(int64_t n) {
  Tensor t = Tensor::host(DType::F32, {n});
  for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = 1.0f;
  return t;
}
}  // namespace

Checkpoint random_checkpoint(const ModelConfig& cfg, DType dtype, uint64_t seed) {
  cfg.validate("random model");
  std::mt19937_64 rng(seed);
  Checkpoint ck;
  ck.path = "random model";
  ck.config = cfg;
  const int64_t H = cfg.hidden_size, F = cfg.intermediate_size, hd = cfg.head_dim;
  const int64_t q = cfg.num_heads * hd, kv = cfg.num_kv_heads * hd;
  auto mat = [&](int64_t rows, int64_t cols) {
    return random_tensor({rows, cols}, dtype, 1.0f / std::sqrt(static_cast<float>(cols)), rng);
  };
  ck.tensors["model.embed_tokens.weight"] = random_tensor({cfg.vocab_size, H}, dtype, 1.0f, rng);
  ck.tensors["model.norm.weight"] = ones(H);
  if (!cfg.tie_word_embeddings) ck.tensors["lm_head.weight"] = mat(cfg.vocab_size, H);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    ck.tensors[p + "input_layernorm.weight"] = ones(H);
    ck.tensors[p + "post_attention_layernorm.weight"] = ones(H);
    ck.tensors[p + "self_attn.q_proj.weight"] = mat(q, H);
    ck.tensors[p + "self_attn.k_proj.weight"] = mat(kv, H);
    ck.tensors[p + "self_attn.v_proj.weight"] = mat(kv, H);
    ck.tensors[p + "self_attn.o_proj.weight"] = mat(H, q);
    ck.tensors[p + "mlp.gate_proj.weight"] = mat(F, H);
    ck.tensors[p + "mlp.up_proj.weight"] = mat(F, H);
    ck.tensors[p + "mlp.down_proj.weight"] = mat(H, F);
    if (cfg.attention_bias) {
      ck.tensors[p + "self_attn.q_proj.bias"] = random_tensor({q}, DType::F32, 0.1f, rng);
      ck.tensors[p + "self_attn.k_proj.bias"] = random_tensor({kv}, DType::F32, 0.1f, rng);
      ck.tensors[p + "self_attn.v_proj.bias"] = random_tensor({kv}, DType::F32, 0.1f, rng);
    }
    if (cfg.qk_norm) {
      ck.tensors[p + "self_attn.q_norm.weight"] = ones(hd);
      ck.tensors[p + "self_attn.k_norm.weight"] = ones(hd);
    }
  }
  return ck;
}

}  // namespace redknot
