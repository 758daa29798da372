// `redknot init-model` and `redknot make-profile` end to end: a 2-layer model at a test shape
// with a real tokenizer is written, loads, runs forward on the CPU backend and generates text;
// layout profiles made from it load through --head-profile.
#include <unistd.h>
#include <cmath>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "backend/builtin.h"
#include "kv/head_profile.h"
#include "loader/hf_config.h"
#include "loader/model_shapes.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string last_line(const std::string& s) {
  size_t end = s.find_last_not_of('\n');
  size_t start = s.rfind('\n', end);
  return s.substr(start == std::string::npos ? 0 : start + 1,
                  end - (start == std::string::npos ? 0 : start + 1) + 1);
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

class InitModelCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/init_model_cli_" + std::to_string(::getpid());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_F(InitModelCli, WritesAModelThatLoadsRunsAndGenerates) {
  RK_REQUIRE_SHARED("tokenizers/llama3/tokenizer.json");
  const std::string model = dir_ + "/llama3";
  CliResult r = run_cli("init-model --config test-llama3 --layers 2 --seed 3 --tokenizer " +
                        shared_path("tokenizers/llama3") + " --out " + model +
                        " --max-shard-bytes 6000000 --quiet");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("wrote " + model), std::string::npos) << r.out;

  // The directory: real config with the override, sharded weights, the tokenizer.
  json cfg = read_json(model + "/config.json");
  EXPECT_EQ(cfg["num_hidden_layers"], 2);
  EXPECT_EQ(cfg["vocab_size"], 128256);
  EXPECT_EQ(cfg["rope_scaling"]["rope_type"], "llama3");
  json index = read_json(model + "/model.safetensors.index.json");
  std::set<std::string> shards;
  for (const auto& [name, f] : index["weight_map"].items()) shards.insert(f.get<std::string>());
  EXPECT_EQ(shards.size(), 3u);  // 2 x 8.2 MB matrices + layers under a 6 MB limit
  EXPECT_TRUE(shards.count("model-00001-of-00003.safetensors"));
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "redknot_init.json"})
    EXPECT_TRUE(fs::exists(model + "/" + std::string(f))) << f;

  Checkpoint ck = load_checkpoint(model);
  EXPECT_EQ(ck.config.num_layers, 2);
  EXPECT_EQ(ck.config.vocab_size, 128256);
  EXPECT_EQ(ck.tensors.size(), index["weight_map"].size());
  EXPECT_EQ(ck.get("lm_head.weight").dtype(), DType::BF16);

  // Forward on the CPU backend: finite, varied logits.
  register_builtin_backends();
  auto backend = create_backend("cpu");
  Model m(ck, *backend);
  ContiguousKvCache kv(*backend, dense_kv_geometry(ck.config), 64, m.inv_freq());
  Tensor logits = run_logits(m, kv, 0, {128000, 9906, 11, 1917, 0}, 5);
  ASSERT_EQ(logits.shape(), (std::vector<int64_t>{5, 128256}));
  double lo = 1e30, hi = -1e30;
  for (int64_t i = 0; i < logits.numel(); ++i) {
    const float v = logits.data<float>()[i];
    ASSERT_TRUE(std::isfinite(v));
    lo = std::min(lo, double(v)), hi = std::max(hi, double(v));
  }
  EXPECT_GT(hi - lo, 0.1);
  EXPECT_LT(hi - lo, 100.0);  // activations stay sane

  // generate from text, through the real tokenizer.
  CliResult g = run_cli("generate --model " + model +
                        " --prompt 'The capital of France is' --max-tokens 4 --ignore-eos --json");
  ASSERT_EQ(g.status, 0) << g.out;
  json out = json::parse(last_line(g.out));
  EXPECT_EQ(out["ids"].size(), 4u);
  for (const auto& id : out["ids"]) EXPECT_LT(id.get<int64_t>(), 128256);

  // make-profile from the directory, loaded by generate --head-profile.
  const std::string prof = dir_ + "/deep.json";
  CliResult p = run_cli("make-profile --model " + model +
                        " --layout deep --global-ratio 0.25 --window 8 --sink 2 --out " + prof);
  ASSERT_EQ(p.status, 0) << p.out;
  HeadProfile hp = HeadProfile::load(prof);
  EXPECT_NO_THROW(hp.check_matches(ck.config, prof));
  EXPECT_EQ(hp.params["layout"], "deep");
  EXPECT_EQ(hp.at(0, 0).cls, HeadClass::Local);
  EXPECT_EQ(hp.at(0, 0).window, 8);
  EXPECT_EQ(hp.last_global_layer(), 1);
  CliResult gp = run_cli("generate --model " + model + " --head-profile " + prof +
                         " --prompt 'The capital of France is' --max-tokens 2 --ignore-eos --json");
  ASSERT_EQ(gp.status, 0) << gp.out;
  EXPECT_EQ(json::parse(last_line(gp.out))["ids"].size(), 2u);

  // Writing again refuses unless --force.
  CliResult again = run_cli("init-model --config test-llama3 --layers 2 --tokenizer " +
                            shared_path("tokenizers/llama3") + " --out " + model + " --quiet");
  EXPECT_EQ(again.status, 1) << again.out;
  EXPECT_NE(again.out.find("--force"), std::string::npos) << again.out;
}

TEST_F(InitModelCli, Qwen3ShapeInF32RunsForward) {
  RK_REQUIRE_SHARED("tokenizers/qwen3/tokenizer.json");
  const std::string model = dir_ + "/qwen3";
  CliResult r = run_cli("init-model --config test-qwen3 --layers 2 --dtype f32 --tokenizer " +
                        shared_path("tokenizers/qwen3") + " --out " + model + " --quiet");
  ASSERT_EQ(r.status, 0) << r.out;
  Checkpoint ck = load_checkpoint(model);
  EXPECT_TRUE(ck.config.qk_norm);
  EXPECT_EQ(ck.get("model.layers.1.self_attn.q_proj.weight").shape(),
            (std::vector<int64_t>{64, 32}));  // 4 heads x 16 != hidden 32
  EXPECT_EQ(ck.get("lm_head.weight").dtype(), DType::F32);
  CliResult g = run_cli("generate --model " + model +
                        " --prompt 'Hello, world' --max-tokens 3 --ignore-eos --json");
  ASSERT_EQ(g.status, 0) << g.out;
  EXPECT_EQ(json::parse(last_line(g.out))["ids"].size(), 3u);
}

TEST(MakeProfileCli, LayoutsFromAKnownConfig) {
  const std::string base = ::testing::TempDir() + "/make_profile_cli_" + std::to_string(::getpid());
  const ModelConfig c = parse_hf_config(model_shape_config("qwen3-32b"), "qwen3-32b");
  for (const char* layout : {"spread", "deep", "front"}) {
    const std::string out = base + "_" + layout + ".json";
    CliResult r =
        run_cli(std::string("make-profile --config qwen3-32b --layout ") + layout +
                " --global-ratio 0.15 --window 512 --sink 4 --seed 1 --quiet --out " + out);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("77 of 512 heads global"), std::string::npos) << r.out;
    HeadProfile p = HeadProfile::load(out);
    p.check_matches(c, out);
    EXPECT_EQ(p.params["layout"], layout);
    EXPECT_NEAR(p.global_fraction(), 77.0 / 512, 1e-12);
    fs::remove(out);
  }
  CliResult bad = run_cli("make-profile --config qwen3-32b --layout middle --out /dev/null");
  EXPECT_NE(bad.status, 0);
  CliResult both = run_cli("make-profile --config qwen3-32b --model x --layout deep --out y");
  EXPECT_NE(both.status, 0);
}

TEST(InitModelList, ListsTheRealShapes) {
  CliResult r = run_cli("init-model --list");
  ASSERT_EQ(r.status, 0) << r.out;
  for (const char* n :
       {"llama3-8b", "llama3.1-8b", "mistral-7b", "qwen3-8b", "qwen3-32b", "llama3.3-70b"})
    EXPECT_NE(r.out.find(n), std::string::npos) << n;
  EXPECT_NE(r.out.find("8.030B"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("70.554B"), std::string::npos) << r.out;
  CliResult missing = run_cli("init-model --config llama3-8b --out /tmp/x");
  EXPECT_NE(missing.status, 0);
}

}  // namespace
}  // namespace redknot::testing
