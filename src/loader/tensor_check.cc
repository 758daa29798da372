#include "loader/tensor_check.h"

#include "core/error.h"

namespace redknot {

void check_checkpoint_tensors(const ModelConfig& c, const std::map<std::string, Tensor>& tensors,
                              const std::string& source) {
  auto need = [&](const std::string& name, std::vector<int64_t> shape) {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Error(source + ": missing tensor '" + name + "'");
    const Tensor& t = it->second;
    if (t.shape() != shape)
      throw Error(source + ": tensor '" + name + "' has shape " + shape_str(t.shape()) +
                  ", expected " + shape_str(shape));
    if (t.dtype() == DType::I32)
      throw Error(source + ": tensor '" + name + "' has dtype i32, expected a float type");
  };
  const int64_t H = c.hidden_size, q_rows = c.num_heads * c.head_dim,
                kv_rows = c.num_kv_heads * c.head_dim, I = c.intermediate_size;
  need("model.embed_tokens.weight", {c.vocab_size, H});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    need(p + "input_layernorm.weight", {H});
    need(p + "post_attention_layernorm.weight", {H});
    need(p + "self_attn.q_proj.weight", {q_rows, H});
    need(p + "self_attn.k_proj.weight", {kv_rows, H});
    need(p + "self_attn.v_proj.weight", {kv_rows, H});
    need(p + "self_attn.o_proj.weight", {H, q_rows});
    need(p + "mlp.gate_proj.weight", {I, H});
    need(p + "mlp.up_proj.weight", {I, H});
    need(p + "mlp.down_proj.weight", {H, I});
    if (c.attention_bias) {
      need(p + "self_attn.q_proj.bias", {q_rows});
      need(p + "self_attn.k_proj.bias", {kv_rows});
      need(p + "self_attn.v_proj.bias", {kv_rows});
    }
    if (c.qk_norm) {
      need(p + "self_attn.q_norm.weight", {c.head_dim});
      need(p + "self_attn.k_norm.weight", {c.head_dim});
    }
  }
  need("model.norm.weight", {H});
  if (!c.tie_word_embeddings || tensors.count("lm_head.weight"))
    need("lm_head.weight", {c.vocab_size, H});
}

}  // namespace redknot
