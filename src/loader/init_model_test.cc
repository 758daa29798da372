// init_model_dir: the directory it writes loads through load_checkpoint with the config it was
// given, its shards and index agree, the values follow the seed rule, and writing is streamed.
#include "loader/init_model.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "loader/checkpoint.h"
#include "loader/hf_config.h"
#include "loader/safetensors.h"
#include "loader/test_util.h"

namespace redknot {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing_util::expect_error;
using testing_util::TempDir;

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// A small vocabulary so that these tests write kilobytes, not megabytes.
json small_config(const std::string& name, int64_t layers, int64_t vocab = 1000) {
  json j = model_shape_config(name, layers);
  j["vocab_size"] = vocab;
  j["bos_token_id"] = 1;
  j["eos_token_id"] = 2;
  return j;
}

float value_at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::BF16 ? bf16_to_f32(t.data<uint16_t>()[i]) : t.data<float>()[i];
}

TEST(InitModel, WritesALoadableShardedDirectory) {
  TempDir dir;
  InitModelOptions o;
  o.config = small_config("test-qwen3", 2);
  o.out_dir = dir.str();
  o.seed = 11;
  o.max_shard_bytes = 40000;  // several shards
  o.chunk_elems = 1000;       // several chunks per tensor
  int64_t calls = 0;
  o.progress = [&](const InitModelProgress& p) {
    ++calls;
    EXPECT_LE(p.bytes_done, p.bytes_total);
  };
  InitModelResult r = init_model_dir(o);
  ASSERT_GE(r.shards.size(), 3u);

  Checkpoint ck = load_checkpoint(dir.str());
  const ModelConfig want = parse_hf_config(o.config, "x");
  EXPECT_EQ(ck.config.num_layers, 2);
  EXPECT_EQ(ck.config.hidden_size, want.hidden_size);
  EXPECT_EQ(ck.config.head_dim, 16);
  EXPECT_EQ(ck.config.num_heads, 4);
  EXPECT_EQ(ck.config.num_kv_heads, 2);
  EXPECT_EQ(ck.config.vocab_size, 1000);
  EXPECT_TRUE(ck.config.qk_norm);
  EXPECT_EQ(read_json(dir.file("config.json")), o.config);

  const std::vector<WeightSpec> specs = weight_specs(ck.config);
  EXPECT_EQ(ck.tensors.size(), specs.size());
  EXPECT_EQ(calls, static_cast<int64_t>(specs.size()));
  EXPECT_EQ(r.parameters, count_parameters(ck.config));

  // The index names every tensor once, in an existing shard that holds it; total_size is the sum.
  json index = read_json(dir.file("model.safetensors.index.json"));
  ASSERT_EQ(index["weight_map"].size(), specs.size());
  uint64_t total = 0;
  std::map<std::string, size_t> per_shard;
  for (size_t s = 0; s < r.shards.size(); ++s) {
    char want_name[64];
    std::snprintf(want_name, sizeof(want_name), "model-%05zu-of-%05zu.safetensors", s + 1,
                  r.shards.size());
    EXPECT_EQ(r.shards[s], want_name);
    // Raw layout: 8-byte length, JSON header padded to 8, contiguous data to the end of the file.
    const std::string bytes = testing_util::read_bytes(dir.file(r.shards[s]));
    uint64_t len = 0;
    std::memcpy(&len, bytes.data(), 8);
    EXPECT_EQ(len % 8, 0u);
    json h = json::parse(bytes.substr(8, len));
    EXPECT_EQ(h["__metadata__"]["format"], "pt");
    uint64_t data = 0;
    for (const auto& [name, e] : h.items()) {
      if (name == "__metadata__") continue;
      EXPECT_EQ(index["weight_map"][name], r.shards[s]) << name;
      data += e["data_offsets"][1].get<uint64_t>() - e["data_offsets"][0].get<uint64_t>();
      ++per_shard[r.shards[s]];
    }
    EXPECT_EQ(8 + len + data, bytes.size());
    total += data;
    // Each shard stays under the limit unless it holds a single tensor.
    EXPECT_TRUE(data <= o.max_shard_bytes || h.size() == 2) << r.shards[s];
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  EXPECT_EQ(total, r.bytes);

  // Values: the seed rule, bf16 by default, norms 1, |w| <= 1/sqrt(fan_in).
  const Tensor& emb = ck.get("model.embed_tokens.weight");
  EXPECT_EQ(emb.dtype(), DType::BF16);
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{999}, emb.numel() - 1})
    EXPECT_EQ(emb.data<uint16_t>()[i],
              f32_to_bf16(init_uniform(11, "model.embed_tokens.weight", i)));
  const Tensor& norm = ck.get("model.layers.1.self_attn.k_norm.weight");
  for (int64_t i = 0; i < norm.numel(); ++i) EXPECT_EQ(value_at(norm, i), 1.0f);
  const Tensor& down = ck.get("model.layers.1.mlp.down_proj.weight");
  const float a = 1.0f / std::sqrt(96.0f);
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < down.numel(); ++i) {
    const float v = value_at(down, i);
    EXPECT_LE(std::fabs(v), a * 1.004f);
    sum += v, sq += double(v) * v;
  }
  const double n = static_cast<double>(down.numel());
  EXPECT_NEAR(sum / n, 0.0, 0.05 * a);
  EXPECT_NEAR(std::sqrt(sq / n), a / std::sqrt(3.0), 0.05 * a);  // U(-a, a)

  const json init = read_json(dir.file("redknot_init.json"));
  EXPECT_EQ(init["seed"], 11);
  EXPECT_EQ(init["parameters"], r.parameters);
}

TEST(InitModel, SameSeedSameBytesWhateverShardsAndThreads) {
  TempDir a, b, c;
  InitModelOptions o;
  o.config = small_config("test-llama3", 2);
  o.dtype = DType::F32;
  o.seed = 5;
  o.out_dir = a.str();
  o.threads = 1;
  init_model_dir(o);
  o.out_dir = b.str();
  o.threads = 3;
  o.max_shard_bytes = 10000;
  o.chunk_elems = 777;
  init_model_dir(o);
  o.out_dir = c.str();
  o.seed = 6;
  init_model_dir(o);
  Checkpoint ca = load_checkpoint(a.str()), cb = load_checkpoint(b.str()),
             cc = load_checkpoint(c.str());
  ASSERT_EQ(ca.tensors.size(), cb.tensors.size());
  for (const auto& [name, t] : ca.tensors) {
    const Tensor& u = cb.get(name);
    ASSERT_EQ(t.nbytes(), u.nbytes()) << name;
    EXPECT_EQ(std::memcmp(t.raw(), u.raw(), t.nbytes()), 0) << name;
    EXPECT_EQ(t.dtype(), DType::F32);
  }
  const Tensor& q5 = ca.get("model.layers.0.self_attn.q_proj.weight");
  const Tensor& q6 = cc.get("model.layers.0.self_attn.q_proj.weight");
  EXPECT_NE(std::memcmp(q5.raw(), q6.raw(), q5.nbytes()), 0);
}

TEST(InitModel, FewerLayersArePrefixOfTheFullModel) {
  TempDir one, two;
  InitModelOptions o;
  o.config = small_config("test-llama3", 1);
  o.out_dir = one.str();
  init_model_dir(o);
  o.config = small_config("test-llama3", 2);
  o.out_dir = two.str();
  init_model_dir(o);
  Checkpoint c1 = load_checkpoint(one.str()), c2 = load_checkpoint(two.str());
  for (const auto& [name, t] : c1.tensors) {
    const Tensor& u = c2.get(name);
    EXPECT_EQ(std::memcmp(t.raw(), u.raw(), t.nbytes()), 0) << name;
  }
  EXPECT_TRUE(c2.has("model.layers.1.mlp.up_proj.weight"));
}

TEST(InitModel, ShardPlan) {
  ModelConfig c = parse_hf_config(small_config("test-llama3", 3), "x");
  const std::vector<WeightSpec> specs = weight_specs(c);
  auto one = plan_shards(specs, DType::BF16, ~uint64_t{0});
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].size(), specs.size());
  auto each = plan_shards(specs, DType::BF16, 1);  // every tensor alone
  EXPECT_EQ(each.size(), specs.size());
  // Tensors stay in order and every one is placed once.
  auto some = plan_shards(specs, DType::F32, 20000);
  size_t next = 0;
  for (const auto& s : some)
    for (size_t i : s) EXPECT_EQ(i, next++);
  EXPECT_EQ(next, specs.size());
}

TEST(InitModel, RefusesToOverwriteUnlessForced) {
  TempDir dir;
  InitModelOptions o;
  o.config = small_config("test-llama3", 1);
  o.out_dir = dir.str();
  init_model_dir(o);
  expect_error([&] { init_model_dir(o); }, {dir.str(), "already holds a model", "--force"});
  o.force = true;
  o.max_shard_bytes = 1;  // now one shard per tensor: the old shard files must not linger
  InitModelResult r = init_model_dir(o);
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir.str()))
    if (e.path().extension() == ".safetensors") ++files;
  EXPECT_EQ(files, r.shards.size());
  EXPECT_NO_THROW(load_checkpoint(dir.str()));
}

TEST(InitModel, TokenizerIsCopiedAndMustFitTheVocabulary) {
  TempDir tok, out;
  // A minimal BPE tokenizer.json whose highest id is 1200 (an added token).
  testing_util::write_bytes(tok.file("tokenizer.json"),
                            R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
          "added_tokens": [{"id": 1200, "content": "<s>"}]})");
  testing_util::write_bytes(tok.file("tokenizer_config.json"), R"({"add_bos_token": true})");
  EXPECT_EQ(tokenizer_json_vocab(tok.file("tokenizer.json")), 1201);
  InitModelOptions o;
  o.config = small_config("test-llama3", 1, /*vocab=*/1000);
  o.out_dir = out.str();
  o.tokenizer_dir = tok.str();
  expect_error([&] { init_model_dir(o); }, {"tokenizer.json", "1200", "vocab_size 1000"});
  EXPECT_FALSE(fs::exists(out.file("config.json")));
  o.config = small_config("test-llama3", 1, /*vocab=*/1280);
  fs::permissions(tok.file("tokenizer.json"), fs::perms::owner_write, fs::perm_options::remove);
  init_model_dir(o);
  o.force = true;
  init_model_dir(o);  // a read-only source makes no read-only copy that --force cannot replace
  EXPECT_NE(fs::status(out.file("tokenizer.json")).permissions() & fs::perms::owner_write,
            fs::perms::none);
  EXPECT_EQ(testing_util::read_bytes(out.file("tokenizer.json")),
            testing_util::read_bytes(tok.file("tokenizer.json")));
  EXPECT_TRUE(fs::exists(out.file("tokenizer_config.json")));
  EXPECT_EQ(load_checkpoint(out.str()).tokenizer_json_path, out.file("tokenizer.json"));

  o.tokenizer_dir = tok.file("missing");
  expect_error([&] { init_model_dir(o); }, {"no tokenizer.json"});
}

TEST(InitModel, RealTokenizersFitTheirConfigs) {
  std::map<std::string, int64_t> vocab;  // each tokenizer parsed once (9-11 MB of JSON)
  for (const ModelShape& m : model_shapes()) {
    if (!*m.tokenizer) continue;
    const std::string tj = testing_util::kShared + "/tokenizers/" + m.tokenizer + "/tokenizer.json";
    if (!fs::exists(tj)) GTEST_SKIP() << "shared test data not found: " << tj;
    const ModelConfig c = parse_hf_config(model_shape_config(m.name), m.name);
    if (!vocab.count(tj)) vocab[tj] = tokenizer_json_vocab(tj);
    EXPECT_LE(vocab[tj], c.vocab_size) << m.name;
    EXPECT_GT(vocab[tj], c.vocab_size - 1000) << m.name;  // the tokenizer of that model family
  }
}

TEST(InitModel, RejectsBadOptions) {
  TempDir dir;
  InitModelOptions o;
  o.config = small_config("test-llama3", 1);
  o.out_dir = dir.str();
  o.dtype = DType::F16;
  expect_error([&] { init_model_dir(o); }, {"bf16 or f32"});
  o.dtype = DType::BF16;
  o.config["num_key_value_heads"] = 3;  // 2 heads not divisible by 3
  EXPECT_THROW(init_model_dir(o), Error);
  EXPECT_FALSE(fs::exists(dir.file("config.json")));
}

}  // namespace
}  // namespace redknot
