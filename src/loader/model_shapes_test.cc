// The real-shape config table: every config parses through hf_config with the public shapes, and
// parameter counts (from shapes alone, no files) match the released models.
#include "loader/model_shapes.h"

#include <gtest/gtest.h>

#include "loader/hf_config.h"
#include "loader/test_util.h"

namespace redknot {
namespace {

ModelConfig parsed(const std::string& name, int64_t layers = 0) {
  ModelConfig c = parse_hf_config(model_shape_config(name, layers), name);
  c.validate(name);
  return c;
}

TEST(ModelShapes, EveryConfigParses) {
  for (const ModelShape& m : model_shapes()) {
    SCOPED_TRACE(m.name);
    ModelConfig c = parsed(m.name);
    EXPECT_GT(count_parameters(c), 0);
    EXPECT_FALSE(c.eos_token_ids.empty());
    EXPECT_GE(c.bos_token_id, 0);
  }
}

TEST(ModelShapes, Llama3_8B) {
  ModelConfig c = parsed("llama3-8b");
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_EQ(c.rope_scaling.type, "none");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_ids, std::vector<int32_t>{128001});
  EXPECT_EQ(count_parameters(c), 8030261248);  // 8.03B
}

TEST(ModelShapes, Llama31_8B) {
  ModelConfig c = parsed("llama3.1-8b");
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position, 8192);
  EXPECT_EQ(count_parameters(c), 8030261248);
}

TEST(ModelShapes, Mistral7B) {
  ModelConfig c = parsed("mistral-7b");
  EXPECT_EQ(c.arch, Arch::Mistral);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.vocab_size, 32768);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.sliding_window, 0);              // v0.3: null
  EXPECT_EQ(count_parameters(c), 7248023552);  // 7.25B
}

TEST(ModelShapes, Qwen3_8B) {
  ModelConfig c = parsed("qwen3-8b");
  EXPECT_EQ(c.arch, Arch::Qwen3);
  EXPECT_EQ(c.num_layers, 36);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.intermediate_size, 12288);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.max_position_embeddings, 40960);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(count_parameters(c), 8190735360);  // 8.19B
}

TEST(ModelShapes, Qwen3_32B) {
  ModelConfig c = parsed("qwen3-32b");
  EXPECT_EQ(c.num_layers, 64);
  EXPECT_EQ(c.hidden_size, 5120);
  EXPECT_EQ(c.num_heads, 64);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);  // 64 * 128 = 8192 != hidden 5120
  EXPECT_EQ(c.intermediate_size, 25600);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_EQ(count_parameters(c), 32762123264);  // 32.8B
}

TEST(ModelShapes, Llama33_70B) {
  ModelConfig c = parsed("llama3.3-70b");
  EXPECT_EQ(c.num_layers, 80);
  EXPECT_EQ(c.hidden_size, 8192);
  EXPECT_EQ(c.num_heads, 64);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.intermediate_size, 28672);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_EQ(count_parameters(c), 70553706496);  // 70.6B
}

TEST(ModelShapes, LayersOverrideAndDtype) {
  nlohmann::json j = model_shape_config("qwen3-8b", 2, "float32");
  EXPECT_EQ(j["num_hidden_layers"], 2);
  EXPECT_EQ(j["max_window_layers"], 2);
  EXPECT_EQ(j["torch_dtype"], "float32");
  ModelConfig c = parsed("qwen3-8b", 2);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.hidden_size, 4096);
}

TEST(ModelShapes, UnknownNameListsTheKnownOnes) {
  testing_util::expect_error([] { model_shape("llama9-1t"); },
                             {"llama9-1t", "llama3-8b", "qwen3-32b", "llama3.3-70b"});
}

TEST(ModelShapes, WeightSpecsFollowTheConfig) {
  ModelConfig c = parsed("qwen3-32b", 1);
  std::vector<WeightSpec> w = weight_specs(c);
  ASSERT_EQ(w.size(), 1u + 11u + 2u);  // embedding, 11 per qk-norm layer, norm + lm_head
  EXPECT_EQ(w.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(w.back().name, "lm_head.weight");
  for (const WeightSpec& s : w)
    if (s.name == "model.layers.0.self_attn.o_proj.weight") {
      EXPECT_EQ(s.shape, (std::vector<int64_t>{5120, 8192}));
      EXPECT_FLOAT_EQ(s.amplitude, 1.0f / std::sqrt(8192.0f));  // fan_in = heads * head_dim
    }
}

}  // namespace
}  // namespace redknot
