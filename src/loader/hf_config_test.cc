#include "loader/hf_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "loader/safetensors.h"
#include "loader/test_util.h"

namespace redknot {
namespace {

using namespace testing_util;
using json = nlohmann::json;

json base_config(const std::string& type) {
  return {{"model_type", type},     {"vocab_size", 100},
          {"hidden_size", 64},      {"intermediate_size", 128},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4},
          {"rms_norm_eps", 1e-6},   {"max_position_embeddings", 1024}};
}

TEST(HfConfig, Llama3Tiny) {
  ModelConfig c = read_hf_config(ref_dir("llama3-tiny") + "/config.json");
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_STREQ(arch_name(c.arch), "llama");
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.intermediate_size, 352);
  EXPECT_EQ(c.num_layers, 3);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position, 8192);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2}));
}

TEST(HfConfig, MistralAndQwen) {
  ModelConfig swa = read_hf_config(ref_dir("mistral-swa-tiny") + "/config.json");
  EXPECT_EQ(swa.arch, Arch::Mistral);
  EXPECT_EQ(swa.sliding_window, 48);
  EXPECT_EQ(swa.rope_scaling.type, "none");
  ModelConfig m = read_hf_config(ref_dir("mistral-tiny") + "/config.json");
  EXPECT_EQ(m.sliding_window, 0);  // "sliding_window": null
  EXPECT_DOUBLE_EQ(m.rope_theta, 1e6);

  ModelConfig q2 = read_hf_config(ref_dir("qwen2-tiny") + "/config.json");
  EXPECT_EQ(q2.arch, Arch::Qwen2);
  EXPECT_TRUE(q2.tie_word_embeddings);
  EXPECT_TRUE(q2.attention_bias);
  EXPECT_FALSE(q2.qk_norm);
  EXPECT_EQ(q2.head_dim, 16);  // hidden / heads
  EXPECT_EQ(q2.sliding_window, 0);

  for (const char* name : {"qwen3-tiny", "qwen3-tiny-bf16"}) {
    ModelConfig q3 = read_hf_config(ref_dir(name) + "/config.json");
    EXPECT_EQ(q3.arch, Arch::Qwen3);
    EXPECT_EQ(q3.head_dim, 32);  // != hidden / heads
    EXPECT_TRUE(q3.qk_norm);
    EXPECT_TRUE(q3.tie_word_embeddings);
    EXPECT_FALSE(q3.attention_bias);
  }
}

// rope_frequencies must reproduce transformers' inv_freq (incl. llama3 scaling) for every ref.
TEST(RopeFrequencies, MatchReferenceForAllRefs) {
  for (const std::string& model : kRefModels) {
    SCOPED_TRACE(model);
    ModelConfig c = read_hf_config(ref_dir(model) + "/config.json");
    SafetensorsFile ref = read_safetensors(ref_dir(model) + "/reference.safetensors");
    const Tensor& inv = ref.tensors.at("rope.inv_freq");
    const Tensor& scale = ref.tensors.at("rope.attention_scaling");
    RopeFreqs r = rope_frequencies(c);
    ASSERT_EQ(static_cast<int64_t>(r.inv_freq.size()), inv.numel());
    ASSERT_EQ(inv.numel(), c.head_dim / 2);
    for (int64_t i = 0; i < inv.numel(); ++i) {
      float want = inv.data<float>()[i];
      EXPECT_NEAR(r.inv_freq[i], want, 1e-6 * std::fabs(want)) << "i=" << i;
    }
    EXPECT_NEAR(r.attention_scaling, scale.data<float>()[0], 1e-6);
  }
}

TEST(RopeFrequencies, Llama3BandsAreDistinct) {
  // The llama3 ref spans all three bands: kept, interpolated and divided by factor.
  ModelConfig c = read_hf_config(ref_dir("llama3-tiny") + "/config.json");
  RopeFreqs scaled = rope_frequencies(c);
  c.rope_scaling.type = "none";
  RopeFreqs plain = rope_frequencies(c);
  int kept = 0, divided = 0, mixed = 0;
  for (size_t i = 0; i < plain.inv_freq.size(); ++i) {
    double ratio = plain.inv_freq[i] / scaled.inv_freq[i];
    if (std::fabs(ratio - 1) < 1e-6)
      ++kept;
    else if (std::fabs(ratio - 8) < 1e-5)
      ++divided;
    else
      ++mixed;
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(mixed, 0);
}

TEST(RopeFrequencies, LinearAndDynamic) {
  ModelConfig c = parse_hf_config(base_config("llama"), "cfg");
  c.head_dim = 16;
  c.rope_theta = 10000;
  RopeFreqs plain = rope_frequencies(c);
  EXPECT_FLOAT_EQ(plain.inv_freq[0], 1.0f);
  EXPECT_NEAR(plain.inv_freq[1], 1.0 / std::pow(10000.0, 2.0 / 16), 1e-7);
  c.rope_scaling.type = "linear";
  c.rope_scaling.factor = 4;
  RopeFreqs lin = rope_frequencies(c);
  for (size_t i = 0; i < lin.inv_freq.size(); ++i)
    EXPECT_NEAR(lin.inv_freq[i], plain.inv_freq[i] / 4, 1e-7);
  c.rope_scaling.type = "dynamic";
  c.rope_scaling.factor = 2;
  c.rope_scaling.original_max_position = 1024;
  // Within the trained length: unchanged.
  RopeFreqs dyn_short = rope_frequencies(c, 1000);
  for (size_t i = 0; i < plain.inv_freq.size(); ++i)
    EXPECT_FLOAT_EQ(dyn_short.inv_freq[i], plain.inv_freq[i]);
  // Beyond it: base = theta * (2 * 4096 / 1024 - 1)^(16 / 14).
  RopeFreqs dyn = rope_frequencies(c, 4096);
  double base = 10000.0 * std::pow(7.0, 16.0 / 14.0);
  for (size_t i = 0; i < dyn.inv_freq.size(); ++i)
    EXPECT_NEAR(dyn.inv_freq[i], 1.0 / std::pow(base, 2.0 * i / 16), 1e-6 * plain.inv_freq[i]);
  EXPECT_EQ(dyn.attention_scaling, 1.0f);
}

TEST(HfConfig, DefaultsAndFallbacks) {
  json j = base_config("llama");
  j.erase("model_type");
  j["architectures"] = {"MistralForCausalLM"};
  j["head_dim"] = nullptr;
  j["eos_token_id"] = {5, 7};
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 12345.0}};
  ModelConfig c = parse_hf_config(j, "cfg.json");
  EXPECT_EQ(c.arch, Arch::Mistral);
  EXPECT_EQ(c.num_kv_heads, 4);  // defaults to heads
  EXPECT_EQ(c.head_dim, 16);     // null -> hidden / heads
  EXPECT_DOUBLE_EQ(c.rope_theta, 12345.0);
  EXPECT_EQ(c.rope_scaling.type, "none");
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{5, 7}));
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_FALSE(c.tie_word_embeddings);

  // Old-style "type" key, linear scaling.
  json l = base_config("llama");
  l["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_EQ(parse_hf_config(l, "x").rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(parse_hf_config(l, "x").rope_scaling.factor, 2.0);
}

TEST(HfConfig, QwenSlidingWindowOnlyWhenEnabled) {
  json j = base_config("qwen2");
  j["sliding_window"] = 4096;
  j["max_window_layers"] = 2;
  j["use_sliding_window"] = false;
  EXPECT_EQ(parse_hf_config(j, "x").sliding_window, 0);
  j["use_sliding_window"] = true;  // but max_window_layers == num layers: no layer uses it
  EXPECT_EQ(parse_hf_config(j, "x").sliding_window, 0);
  j["max_window_layers"] = 0;
  EXPECT_EQ(parse_hf_config(j, "x").sliding_window, 4096);
  j["max_window_layers"] = 1;
  expect_error([&] { parse_hf_config(j, "cfgpath"); }, {"cfgpath", "max_window_layers"});
}

TEST(HfConfig, GenerationConfigEosIsAdded) {
  TempDir dir;
  json j = base_config("llama");
  j["eos_token_id"] = 2;
  write_bytes(dir.file("config.json"), j.dump());
  write_bytes(dir.file("generation_config.json"), json{{"eos_token_id", {2, 9}}}.dump());
  EXPECT_EQ(read_hf_config(dir.file("config.json")).eos_token_ids, (std::vector<int32_t>{2, 9}));
}

TEST(HfConfig, Errors) {
  TempDir dir;
  const std::string p = dir.file("config.json");
  json j = base_config("gpt_neox");
  write_bytes(p, j.dump());
  expect_error([&] { read_hf_config(p); },
               {p, "unsupported architecture 'gpt_neox'", "llama, mistral, qwen2, qwen3"});
  j = base_config("llama");
  j.erase("hidden_size");
  write_bytes(p, j.dump());
  expect_error([&] { read_hf_config(p); }, {p, "hidden_size"});
  j = base_config("llama");
  j["num_key_value_heads"] = 3;
  write_bytes(p, j.dump());
  expect_error([&] { read_hf_config(p); }, {p, "num_key_value_heads"});
  j = base_config("llama");
  j["vocab_size"] = "many";
  write_bytes(p, j.dump());
  expect_error([&] { read_hf_config(p); }, {p, "vocab_size", "integer"});
  j = base_config("llama");
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  write_bytes(p, j.dump());
  expect_error([&] { read_hf_config(p); }, {p, "yarn"});
  write_bytes(p, "{\"model_type\": ");
  expect_error([&] { read_hf_config(p); }, {p, "invalid JSON"});
  expect_error([&] { read_hf_config(dir.file("nope.json")); }, {"nope.json", "cannot open"});
}

}  // namespace
}  // namespace redknot
