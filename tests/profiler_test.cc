// The head profiler: a model whose heads are global or local by construction comes out
// classified exactly so; `redknot profile` writes valid profiles for real models that
// `redknot generate --head-profile` accepts; bad inputs are clear errors.
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/error.h"
#include "engine/profiler.h"
#include "model/random_checkpoint.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

std::string write_temp(const std::string& name, const std::string& text) {
  std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

using Pair = std::pair<int, int>;  // (layer, kv head)

// 2 layers x 4 kv heads (2 query heads each), head_dim 32, f32.
ModelConfig constructed_config() {
  ModelConfig c = preset_config("tiny");
  c.hidden_size = 256, c.intermediate_size = 256, c.num_layers = 2;
  c.num_heads = 8, c.num_kv_heads = 4, c.head_dim = 32;
  return c;
}

// Heads in `global` get q = 0 (uniform attention over every key: far-reaching); the others get
// q = alpha * k of their own kv head, so each query attends (almost) only to its own key.
Checkpoint constructed_checkpoint(const std::set<Pair>& global, float alpha) {
  const ModelConfig cfg = constructed_config();
  Checkpoint ck = random_checkpoint(cfg, DType::F32, 7);
  const int64_t hd = cfg.head_dim, hidden = cfg.hidden_size;
  const int64_t group = cfg.num_heads / cfg.num_kv_heads;
  for (int l = 0; l < cfg.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    float* wq = ck.tensors.at(p + "q_proj.weight").data<float>();        // [heads*hd, hidden]
    const float* wk = ck.tensors.at(p + "k_proj.weight").data<float>();  // [kv*hd, hidden]
    for (int h = 0; h < cfg.num_heads; ++h) {
      const int g = static_cast<int>(h / group);
      float* rows = wq + h * hd * hidden;
      const float* krows = wk + g * hd * hidden;
      const bool is_global = global.count({l, g}) != 0;
      for (int64_t i = 0; i < hd * hidden; ++i) rows[i] = is_global ? 0.0f : alpha * krows[i];
    }
  }
  return ck;
}

// Distinct ids (a permutation of the vocabulary), so no two keys of a run share a token.
std::vector<int32_t> distinct_ids(int n, uint64_t seed) {
  std::vector<int32_t> ids(n);
  for (int i = 0; i < n; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(seed));
  return ids;
}

struct ConstructedModel {
  explicit ConstructedModel(const std::set<Pair>& global) {
    register_builtin_backends();
    ckpt = constructed_checkpoint(global, 40.0f);
    backend = create_backend("cpu");
    model = std::make_unique<Model>(ckpt, *backend);
  }
  Checkpoint ckpt;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
};

ProfileOptions small_options(double ratio) {
  ProfileOptions o;
  o.ratio = ratio, o.window = 32, o.sink = 4, o.max_tokens = 256, o.num_prefixes = 2;
  o.warn = [](const std::string&) {};
  return o;
}

TEST(Profiler, ConstructedHeadsAreClassifiedExactly) {
  const std::set<Pair> global = {{0, 1}, {1, 0}, {1, 3}};
  ConstructedModel m(global);
  int runs = 0;
  ProfileOptions o = small_options(3.0 / 8.0);
  o.progress = [&](const ProfileProgress& p) {
    ++runs;
    EXPECT_EQ(p.run, runs);
    EXPECT_LE(p.tokens, 256);
  };
  HeadProfile p = profile_heads(*m.model, {distinct_ids(512, 1)}, o);
  ASSERT_EQ(p.num_layers(), 2);
  ASSERT_EQ(p.num_kv_heads(), 4);
  EXPECT_EQ(runs, 4 * 3);  // 4 chunks of 128, each alone and behind 2 prefixes
  for (int l = 0; l < 2; ++l)
    for (int g = 0; g < 4; ++g) {
      const HeadSpec& s = p.at(l, g);
      SCOPED_TRACE("layer " + std::to_string(l) + " kv head " + std::to_string(g));
      // The construction behaves as meant: uniform heads reach far, diagonal ones do not
      // and do not notice the prefix.
      if (global.count({l, g})) {
        EXPECT_EQ(s.cls, HeadClass::Global);
        EXPECT_GT(s.edge_mass, 0.5);
      } else {
        EXPECT_EQ(s.cls, HeadClass::Local);
        EXPECT_EQ(s.window, 32);
        EXPECT_EQ(s.sink, 4);
        EXPECT_LT(s.edge_mass, 0.02);
        EXPECT_LT(s.prefix_shift, 0.02);
      }
      EXPECT_DOUBLE_EQ(s.score, std::max(s.edge_mass, s.prefix_shift));
    }
  EXPECT_DOUBLE_EQ(p.global_fraction(), 3.0 / 8.0);
  EXPECT_EQ(p.params["window"], 32);
  EXPECT_EQ(p.params["num_prefixes"], 2);
  EXPECT_EQ(p.params["chunk_tokens"], 128);
  EXPECT_EQ(p.params["calibration_tokens"], 512);
  EXPECT_EQ(profile_class_map(p), (std::vector<std::string>{"L0: LGLL", "L1: GLLG"}));

  // The saved file loads back with the same classes and scores.
  const std::string path = ::testing::TempDir() + "/constructed_profile.json";
  p.save(path);
  HeadProfile back = HeadProfile::load(path);
  back.check_matches(m.model->config(), path);
  for (int l = 0; l < 2; ++l)
    for (int g = 0; g < 4; ++g) {
      EXPECT_EQ(back.at(l, g).cls, p.at(l, g).cls);
      EXPECT_DOUBLE_EQ(back.at(l, g).score, p.at(l, g).score);
    }
}

TEST(Profiler, RatioRoundsUpDenseLayersAndThresholdsForceGlobal) {
  const std::set<Pair> global = {{1, 2}};
  ConstructedModel m(global);
  const std::vector<std::vector<int32_t>> calib = {distinct_ids(512, 2)};
  ProfileOptions o = small_options(0.1);  // 0.8 of a head -> 1 head
  o.max_chunks = 2;
  HeadProfile p = profile_heads(*m.model, calib, o);
  EXPECT_EQ(profile_class_map(p), (std::vector<std::string>{"L0: LLLL", "L1: LLGL"}));

  o.ratio = 0.0, o.dense_layers = 1;
  p = profile_heads(*m.model, calib, o);
  EXPECT_EQ(profile_class_map(p), (std::vector<std::string>{"L0: GGGG", "L1: LLLL"}));

  o.dense_layers = 0, o.edge_mass_threshold = 0.3;
  p = profile_heads(*m.model, calib, o);
  EXPECT_EQ(profile_class_map(p), (std::vector<std::string>{"L0: LLLL", "L1: LLGL"}));
}

TEST(Profiler, BadInputsAreClearErrors) {
  ConstructedModel m({});
  ProfileOptions o = small_options(0.15);
  try {
    profile_heads(*m.model, {{1, 2, 3, 4, 5}}, o);
    ADD_FAILURE() << "short calibration accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("too short"), std::string::npos) << e.what();
  }
  try {
    std::vector<int32_t> ids = distinct_ids(512, 3);
    ids[10] = 999;
    profile_heads(*m.model, {ids}, o);
    ADD_FAILURE() << "out-of-vocabulary id accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("999"), std::string::npos) << e.what();
  }
  o.ratio = 1.5;
  EXPECT_THROW(profile_heads(*m.model, {distinct_ids(512, 3)}, o), Error);
  // Little text: still profiles (shorter chunks) and warns.
  o.ratio = 0.15;
  std::vector<std::string> warnings;
  o.warn = [&](const std::string& w) { warnings.push_back(w); };
  HeadProfile p = profile_heads(*m.model, {distinct_ids(60, 4)}, o);
  EXPECT_EQ(p.params["chunk_tokens"], 20);
  EXPECT_FALSE(warnings.empty());
}

// Timing on a ~10M-parameter shape (stories15M-like) at 2048-token runs; run by hand with
// --gtest_also_run_disabled_tests.
TEST(Profiler, DISABLED_TimingTenMillionParams) {
  register_builtin_backends();
  ModelConfig c = preset_config("tiny");
  c.vocab_size = 8192, c.hidden_size = 320, c.intermediate_size = 864, c.num_layers = 8;
  c.num_heads = 8, c.num_kv_heads = 4, c.head_dim = 40;
  Checkpoint ck = random_checkpoint(c, DType::F32, 1);
  auto be = create_backend("cpu");
  Model model(ck, *be);
  std::mt19937 rng(1);
  std::vector<int32_t> ids(16384);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % c.vocab_size);
  ProfileOptions o;  // defaults: window 512, max_tokens 2048, 8 chunks x (1 + 2 prefixes)
  const auto t0 = std::chrono::steady_clock::now();
  HeadProfile p = profile_heads(model, {ids}, o);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%.1f M params: %.1f s, global fraction %.3f\n", model.weight_bytes() / 4e6, s,
              p.global_fraction());
}

const char* kStories =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her red ball. One day, she saw a big dog under a tree. The dog was sad because "
    "it was lost. Lily gave the dog a hug and said, \"Do not worry, I will help you find your "
    "home.\" They walked together and found the dog's mom. The dog was happy and Lily smiled.\n\n"
    "Tom was a small boy who liked to eat apples. One morning, his mom gave him a big green "
    "apple. Tom wanted to share it with his friend Sam. Sam said, \"Thank you, Tom! You are a "
    "good friend.\" They sat on the grass and ate the apple together. The sun was warm and the "
    "birds were singing. Tom and Sam were very happy.\n\n"
    "There was a little cat named Mittens. Mittens liked to sleep in the sun. One day, a bird "
    "came to the window. Mittens wanted to play with the bird, but the bird flew away. Mittens "
    "was sad. Then her friend the mouse came to play. They ran and jumped all day long. At "
    "night, Mittens went back to sleep in her soft bed.\n\n"
    "Once upon a time, a boy named Ben had a toy car. He liked to make it go fast. One day, the "
    "car broke. Ben was very sad and he cried. His dad came and said, \"Let me help you.\" Dad "
    "fixed the car with glue. Ben said, \"Thank you, Dad!\" He played with his car again and "
    "was very happy. He learned that it is good to ask for help.\n\n"
    "Sue and her brother went to the beach. They built a big sand castle with a tall tower. A "
    "wave came and took the castle away. Sue was sad, but her brother said, \"We can build a "
    "new one!\" They worked together and made an even bigger castle. Mom took a picture of "
    "them. They were proud and happy.\n";

// Checks a profile written by the CLI against the model shape and the ratio.
void check_profile_file(const std::string& path, int layers, int kv_heads, double ratio) {
  HeadProfile p = HeadProfile::load(path);
  ASSERT_EQ(p.num_layers(), layers);
  ASSERT_EQ(p.num_kv_heads(), kv_heads);
  const int pairs = layers * kv_heads;
  const int want_global = static_cast<int>(std::ceil(ratio * pairs - 1e-9));
  // Ties at the cut also become global, so this is a lower bound that real scores hit exactly.
  EXPECT_GE(p.global_fraction() * pairs, want_global - 1e-9);
  EXPECT_NEAR(p.global_fraction(), static_cast<double>(want_global) / pairs, 1e-9);
  for (int l = 0; l < layers; ++l)
    for (int g = 0; g < kv_heads; ++g) {
      const HeadSpec& s = p.at(l, g);
      for (double v : {s.score, s.prefix_shift, s.edge_mass}) {
        EXPECT_TRUE(std::isfinite(v));
        EXPECT_GE(v, 0.0);
        EXPECT_LE(v, 1.0 + 1e-6);
      }
      if (s.cls == HeadClass::Local) {
        EXPECT_EQ(s.window, 32);
        EXPECT_EQ(s.sink, 4);
      }
    }
  EXPECT_EQ(p.params["window"], 32);
  EXPECT_EQ(p.params["max_tokens"], 256);
}

TEST(ProfileCli, Stories260KWithTextAndGenerate) {
  RK_REQUIRE_SHARED("models/stories260K/stories260K.gguf");
  const std::string model = shared_path("models/stories260K/stories260K.gguf");
  const std::string calib = write_temp("stories_calib.txt", kStories);
  const std::string out = ::testing::TempDir() + "/stories_profile.json";
  CliResult r = run_cli("profile --model " + model + " --calib " + calib + " --out " + out +
                        " --ratio 0.15 --window 32 --sink 4 --max-tokens 256");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("L0: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("profile: run 1/"), std::string::npos) << r.out;
  std::cout << r.out;
  Checkpoint ck = load_checkpoint(model);
  check_profile_file(out, static_cast<int>(ck.config.num_layers),
                     static_cast<int>(ck.config.num_kv_heads), 0.15);
  HeadProfile p = HeadProfile::load(out);
  EXPECT_EQ(p.params["calibration"]["files"][0]["path"], calib);
  EXPECT_GT(p.params["calibration"]["files"][0]["tokens"].get<int>(), 300);

  CliResult g = run_cli("generate --model " + model + " --head-profile " + out +
                        " --prompt \"Once upon a time\" --max-tokens 40 --json");
  EXPECT_EQ(g.status, 0) << g.out;
}

TEST(ProfileCli, RefsModelWithIdsAndGenerate) {
  RK_REQUIRE_SHARED("refs/llama3-tiny");
  const std::string model = shared_path("refs/llama3-tiny");
  std::mt19937 rng(5);
  std::vector<int32_t> ids(600);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % 512);
  const std::string calib = write_temp("llama3_calib_ids.json", nlohmann::json(ids).dump());
  const std::string out = ::testing::TempDir() + "/llama3_profile.json";
  CliResult r = run_cli("profile --model " + model + " --calib-ids " + calib + " --out " + out +
                        " --window 32 --sink 4 --max-tokens 256 --dense-layers 0");
  ASSERT_EQ(r.status, 0) << r.out;
  Checkpoint ck = load_checkpoint(model);
  check_profile_file(out, static_cast<int>(ck.config.num_layers),
                     static_cast<int>(ck.config.num_kv_heads), 0.15);

  CliResult g = run_cli("generate --model " + model + " --head-profile " + out +
                        " --prompt-ids 1,5,9,200,17,300 --max-tokens 40 --ignore-eos --json");
  EXPECT_EQ(g.status, 0) << g.out;

  // Dense layers come on top of the ratio.
  CliResult d = run_cli("profile --model " + model + " --calib-ids " + calib + " --out " + out +
                        " --window 32 --max-tokens 256 --dense-layers 1 --quiet");
  ASSERT_EQ(d.status, 0) << d.out;
  HeadProfile p = HeadProfile::load(out);
  for (int g2 = 0; g2 < p.num_kv_heads(); ++g2) EXPECT_EQ(p.at(0, g2).cls, HeadClass::Global);
  EXPECT_GE(p.global_fraction(), 1.0 / ck.config.num_layers);
}

TEST(ProfileCli, BadInputsAreClearErrors) {
  RK_REQUIRE_SHARED("models/stories260K/stories260K.gguf");
  RK_REQUIRE_SHARED("refs/llama3-tiny");
  const std::string stories = shared_path("models/stories260K/stories260K.gguf");
  const std::string llama = shared_path("refs/llama3-tiny");
  const std::string out = ::testing::TempDir() + "/bad_profile.json";

  CliResult missing =
      run_cli("profile --model " + stories + " --calib /nonexistent/calib.txt" + " --out " + out);
  EXPECT_EQ(missing.status, 1) << missing.out;
  EXPECT_NE(missing.out.find("/nonexistent/calib.txt"), std::string::npos) << missing.out;
  EXPECT_NE(missing.out.find("cannot open"), std::string::npos) << missing.out;

  const std::string text = write_temp("bad_calib.txt", kStories);
  CliResult no_tok = run_cli("profile --model " + llama + " --calib " + text + " --out " + out);
  EXPECT_EQ(no_tok.status, 1) << no_tok.out;
  EXPECT_NE(no_tok.out.find("no tokenizer"), std::string::npos) << no_tok.out;

  const std::string bad_ids = write_temp("bad_ids.json", "[1, 2, \"x\"]");
  CliResult ids = run_cli("profile --model " + llama + " --calib-ids " + bad_ids + " --out " + out);
  EXPECT_EQ(ids.status, 1) << ids.out;
  EXPECT_NE(ids.out.find("bad_ids.json"), std::string::npos) << ids.out;

  // A profile of another shape (3 layers x 2 kv heads) is refused by generate on stories260K.
  HeadProfile other(3, 2);
  const std::string other_path = ::testing::TempDir() + "/other_shape_profile.json";
  other.save(other_path);
  CliResult shape = run_cli("generate --model " + stories + " --head-profile " + other_path +
                            " --prompt-ids 1 --max-tokens 2");
  EXPECT_EQ(shape.status, 1) << shape.out;
  EXPECT_NE(shape.out.find("head profile is for 3 layers x 2 kv heads"), std::string::npos)
      << shape.out;
  EXPECT_NE(shape.out.find(other_path), std::string::npos) << shape.out;
}

}  // namespace
}  // namespace redknot::testing
