#include "loader/checkpoint.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/mmap_file.h"
#include "loader/safetensors.h"
#include "loader/test_util.h"

namespace redknot {
namespace {

using namespace testing_util;
namespace fs = std::filesystem;

// Copies a refs model dir into `dir` with its tensors passed through `edit`.
template <typename Edit>
void copy_model(const std::string& model, const TempDir& dir, Edit edit) {
  fs::copy_file(ref_dir(model) + "/config.json", dir.file("config.json"));
  SafetensorsFile f = read_safetensors(ref_dir(model) + "/model.safetensors");
  edit(f.tensors);
  write_safetensors(dir.file("model.safetensors"), f.tensors);
}

TEST(Checkpoint, EveryRefModelLoads) {
  for (const std::string& model : kRefModels) {
    SCOPED_TRACE(model);
    Checkpoint ck = load_checkpoint(ref_dir(model));
    const ModelConfig& c = ck.config;
    EXPECT_EQ(ck.path, ref_dir(model));
    EXPECT_FALSE(ck.gguf_vocab.has_value());
    EXPECT_TRUE(ck.tokenizer_json_path.empty());  // no tokenizer.json in refs dirs
    const int64_t layer_tensors = 9 + (c.attention_bias ? 3 : 0) + (c.qk_norm ? 2 : 0);
    EXPECT_EQ(static_cast<int64_t>(ck.tensors.size()),
              2 + (c.tie_word_embeddings ? 0 : 1) + c.num_layers * layer_tensors);
    EXPECT_EQ(ck.has("lm_head.weight"), !c.tie_word_embeddings);
    const Tensor& q = ck.get("model.layers.1.self_attn.q_proj.weight");
    EXPECT_EQ(q.shape(), (std::vector<int64_t>{c.num_heads * c.head_dim, c.hidden_size}));
    EXPECT_EQ(q.dtype(), DType::F32);
    // f32 files: every tensor is a view into one mapping.
    auto file = std::static_pointer_cast<MappedFile>(ck.get("model.norm.weight").holder());
    ASSERT_EQ(file->path(), ref_dir(model) + "/model.safetensors");
    for (const auto& [name, t] : ck.tensors) {
      EXPECT_EQ(t.holder().get(), file.get()) << name;
      auto p = static_cast<const uint8_t*>(t.raw());
      EXPECT_TRUE(p >= file->data() && p + t.nbytes() <= file->data() + file->size()) << name;
      EXPECT_EQ(t.device(), Device::Host);
    }
  }
}

TEST(Checkpoint, ArchSpecificTensors) {
  Checkpoint q2 = load_checkpoint(ref_dir("qwen2-tiny"));
  EXPECT_EQ(q2.get("model.layers.0.self_attn.k_proj.bias").shape(), (std::vector<int64_t>{32}));
  EXPECT_FALSE(q2.has("model.layers.0.self_attn.o_proj.bias"));
  Checkpoint q3 = load_checkpoint(ref_dir("qwen3-tiny"));
  EXPECT_EQ(q3.get("model.layers.2.self_attn.q_norm.weight").shape(), (std::vector<int64_t>{32}));
  EXPECT_EQ(q3.get("model.layers.0.self_attn.o_proj.weight").shape(),
            (std::vector<int64_t>{128, 256}));
  expect_error([&] { q3.get("lm_head.weight"); }, {ref_dir("qwen3-tiny"), "missing tensor"});
}

TEST(Checkpoint, Bf16WeightsLoadAsBf16) {
  // The shared qwen3-tiny-bf16 file stores its weights as F32 (not even bf16-exact), so write
  // a true BF16 copy and check that it loads as BF16 with the rounded values.
  TempDir dir;
  Checkpoint f32 = load_checkpoint(ref_dir("qwen3-tiny-bf16"));
  EXPECT_EQ(f32.get("model.embed_tokens.weight").dtype(), DType::F32);
  copy_model("qwen3-tiny-bf16", dir, [](std::map<std::string, Tensor>& m) {
    for (auto& [name, t] : m) {
      Tensor b = Tensor::host(DType::BF16, t.shape());
      convert_from_f32(t.data<float>(), DType::BF16, b.raw(), t.numel());
      t = b;
    }
  });
  Checkpoint ck = load_checkpoint(dir.str());
  ASSERT_EQ(ck.tensors.size(), f32.tensors.size());
  for (const auto& [name, t] : ck.tensors) {
    ASSERT_EQ(t.dtype(), DType::BF16) << name;
    const Tensor& ref = f32.get(name);
    ASSERT_EQ(t.shape(), ref.shape()) << name;
    for (int64_t i = 0; i < t.numel(); ++i)
      ASSERT_EQ(t.data<uint16_t>()[i], f32_to_bf16(ref.data<float>()[i])) << name << " @" << i;
  }
}

TEST(Checkpoint, MissingTensor) {
  TempDir dir;
  copy_model("llama3-tiny", dir, [](std::map<std::string, Tensor>& m) {
    m.erase("model.layers.2.mlp.up_proj.weight");
  });
  expect_error([&] { load_checkpoint(dir.str()); },
               {dir.str(), "missing tensor 'model.layers.2.mlp.up_proj.weight'"});
}

TEST(Checkpoint, MissingArchSpecificTensors) {
  TempDir d1, d2, d3;
  copy_model("qwen2-tiny", d1, [](auto& m) { m.erase("model.layers.1.self_attn.v_proj.bias"); });
  expect_error([&] { load_checkpoint(d1.str()); },
               {d1.str(), "missing tensor 'model.layers.1.self_attn.v_proj.bias'"});
  copy_model("qwen3-tiny", d2, [](auto& m) { m.erase("model.layers.0.self_attn.k_norm.weight"); });
  expect_error([&] { load_checkpoint(d2.str()); },
               {d2.str(), "missing tensor 'model.layers.0.self_attn.k_norm.weight'"});
  copy_model("mistral-tiny", d3, [](auto& m) { m.erase("lm_head.weight"); });  // untied
  expect_error([&] { load_checkpoint(d3.str()); }, {d3.str(), "missing tensor 'lm_head.weight'"});
}

TEST(Checkpoint, WrongShape) {
  TempDir dir;
  copy_model("mistral-tiny", dir, [](std::map<std::string, Tensor>& m) {
    m["model.layers.1.self_attn.k_proj.weight"] = Tensor::host(DType::F32, {64, 128});
  });
  expect_error([&] { load_checkpoint(dir.str()); },
               {dir.str(), "'model.layers.1.self_attn.k_proj.weight'", "shape [64, 128]",
                "expected [32, 128]"});
}

TEST(Checkpoint, UnknownModelType) {
  TempDir dir;
  copy_model("qwen2-tiny", dir, [](auto&) {});
  auto cfg = nlohmann::json::parse(read_bytes(dir.file("config.json")));
  cfg["model_type"] = "falcon";
  write_bytes(dir.file("config.json"), cfg.dump());
  expect_error([&] { load_checkpoint(dir.str()); },
               {dir.file("config.json"), "unsupported architecture 'falcon'"});
}

TEST(Checkpoint, ShardedDirWithTokenizer) {
  TempDir dir;
  fs::copy_file(ref_dir("qwen2-tiny") + "/config.json", dir.file("config.json"));
  SafetensorsFile f = read_safetensors(ref_dir("qwen2-tiny") + "/model.safetensors");
  std::map<std::string, Tensor> a, b;
  nlohmann::json wm = nlohmann::json::object();
  for (const auto& [name, t] : f.tensors) {
    bool first =
        name.find("layers.0.") != std::string::npos || name.find("embed") != std::string::npos;
    (first ? a : b)[name] = t;
    wm[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(dir.file("model-00001-of-00002.safetensors"), a);
  write_safetensors(dir.file("model-00002-of-00002.safetensors"), b);
  write_bytes(dir.file("model.safetensors.index.json"), nlohmann::json{{"weight_map", wm}}.dump());
  write_bytes(dir.file("tokenizer.json"), "{}");
  Checkpoint ck = load_checkpoint(dir.str());
  EXPECT_EQ(ck.tensors.size(), f.tensors.size());
  EXPECT_EQ(ck.tokenizer_json_path, dir.file("tokenizer.json"));
  for (const auto& [name, t] : f.tensors)
    EXPECT_EQ(std::memcmp(ck.get(name).raw(), t.raw(), t.nbytes()), 0) << name;
}

TEST(Checkpoint, BadPaths) {
  TempDir dir;
  expect_error([&] { load_checkpoint(dir.file("nothing")); }, {dir.file("nothing"), "no such"});
  expect_error([&] { load_checkpoint(dir.str()); }, {dir.str(), "config.json"});
  write_bytes(dir.file("weights.bin"), "hello world");
  expect_error([&] { load_checkpoint(dir.file("weights.bin")); }, {dir.file("weights.bin")});
  fs::copy_file(ref_dir("llama3-tiny") + "/config.json", dir.file("config.json"));
  expect_error([&] { load_checkpoint(dir.str()); }, {dir.str(), "model.safetensors"});
  // Truncated weights behind a valid config.
  std::string w = read_bytes(ref_dir("llama3-tiny") + "/model.safetensors");
  write_bytes(dir.file("model.safetensors"), w.substr(0, w.size() / 2));
  expect_error([&] { load_checkpoint(dir.str()); }, {dir.file("model.safetensors"), "truncated"});
}

}  // namespace
}  // namespace redknot
