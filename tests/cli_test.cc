// The `redknot` binary end to end: generate (--json, --logits-out), tokenize, and clear errors
// with a non-zero exit on bad input.
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/engine_setup.h"
#include "test_support.h"
#include "tokenizer/tokenizer.h"

namespace redknot::testing {
namespace {

std::string last_line(const std::string& s) {
  size_t end = s.find_last_not_of('\n');
  size_t start = s.rfind('\n', end);
  return s.substr(start == std::string::npos ? 0 : start + 1,
                  end - (start == std::string::npos ? 0 : start + 1) + 1);
}

TEST(Cli, GenerateJsonFromGguf) {
  RK_REQUIRE_SHARED("models/stories260K/stories260K.gguf");
  CliResult r = run_cli("generate --model " + shared_path("models/stories260K/stories260K.gguf") +
                        " --prompt-ids 1 --max-tokens 20 --json");
  ASSERT_EQ(r.status, 0) << r.out;
  auto j = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(j["ids"].size(), 20u);
  EXPECT_EQ(j["text"].get<std::string>().rfind("Once upon a time, there was", 0), 0u) << r.out;
}

TEST(Cli, LogitsOutMatchesReference) {
  RK_REQUIRE_SHARED("refs/qwen2-tiny");
  SafetensorsFile ref = read_safetensors(shared_path("refs/qwen2-tiny/reference.safetensors"));
  std::vector<int32_t> ids = to_ids(ref.tensors.at("input_ids.1"));
  std::string list;
  for (size_t i = 0; i < ids.size(); ++i) list += (i ? "," : "") + std::to_string(ids[i]);
  std::string out = ::testing::TempDir() + "/logits.safetensors";
  CliResult r = run_cli("generate --model " + shared_path("refs/qwen2-tiny") + " --prompt-ids " +
                        list + " --max-tokens 1 --json --logits-out " + out);
  ASSERT_EQ(r.status, 0) << r.out;
  SafetensorsFile got = read_safetensors(out);
  const Tensor& l = got.tensors.at("logits");
  const Tensor& want = ref.tensors.at("logits.1");
  ASSERT_EQ(l.shape(), want.shape());
  double max_diff = 0;
  for (int64_t i = 0; i < l.numel(); ++i)
    max_diff = std::max(max_diff, double(std::fabs(l.data<float>()[i] - want.data<float>()[i])));
  EXPECT_LE(max_diff, 1e-3);
}

// --quantization fp8 --kv-cache-dtype fp8: the CLI's logits are the engine's FP8 logits (same
// path in process), close to HF's; values that are not implemented are errors naming the choices.
TEST(Cli, Fp8FlagsAndBadValues) {
  RK_REQUIRE_SHARED("refs/qwen2-tiny");
  const std::string model = shared_path("refs/qwen2-tiny");
  SafetensorsFile ref = read_safetensors(model + "/reference.safetensors");
  std::vector<int32_t> ids = to_ids(ref.tensors.at("input_ids.1"));
  std::string list;
  for (size_t i = 0; i < ids.size(); ++i) list += (i ? "," : "") + std::to_string(ids[i]);
  const std::string out = ::testing::TempDir() + "/logits_fp8.safetensors";
  CliResult r = run_cli("generate --model " + model + " --prompt-ids " + list +
                        " --max-tokens 1 --json --quantization fp8 --kv-cache-dtype fp8"
                        " --logits-out " +
                        out);
  ASSERT_EQ(r.status, 0) << r.out;
  const Tensor got = read_safetensors(out).tensors.at("logits");
  EngineOptions eo;
  eo.quantization = "fp8";
  eo.kv_cache_dtype = "fp8";
  eo.request_tokens = static_cast<int64_t>(ids.size()) + 2;
  LoadedEngineModel m = open_engine_model(model, eo);
  EngineStores stores = build_engine_stores(*m.model, m.ckpt, eo);
  ASSERT_EQ(stores.kv.pool->kv_dtype(), DType::F8_E4M3);
  const Tensor want = run_logits(*m.model, *stores.kv.cache, 0, ids, 4096);
  const Tensor& hf = ref.tensors.at("logits.1");
  ASSERT_EQ(got.shape(), want.shape());
  double max_diff = 0, ab = 0, aa = 0, bb = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double g = got.data<float>()[i], h = hf.data<float>()[i];
    max_diff = std::max(max_diff, std::fabs(g - want.data<float>()[i]));
    ab += g * h, aa += g * g, bb += h * h;
  }
  EXPECT_LE(max_diff, 1e-4) << "CLI vs in-process FP8 engine";
  EXPECT_GE(ab / std::sqrt(aa * bb), 0.99) << "FP8 logits vs HF's";
  for (auto [flag, needle] :
       {std::pair{"--quantization int4", "'int4' is not supported (none, fp8)"},
        std::pair{"--kv-cache-dtype fp16", "'fp16' is not supported (auto, fp8)"}}) {
    CliResult bad =
        run_cli("generate --model " + model + " --prompt-ids 1,2 --max-tokens 1 " + flag);
    EXPECT_NE(bad.status, 0) << flag;
    EXPECT_NE(bad.out.find(needle), std::string::npos) << flag << ": " << bad.out;
  }
}

TEST(Cli, TokenizeRoundTrip) {
  RK_REQUIRE_SHARED("tokenizers/qwen3/tokenizer.json");
  const std::string tj = shared_path("tokenizers/qwen3/tokenizer.json");
  const std::string text = "Hello, wörld! 你好 <|im_end|>";
  CliResult enc = run_cli("tokenize --model " + tj, text);
  ASSERT_EQ(enc.status, 0) << enc.out;
  auto ids = nlohmann::json::parse(enc.out).get<std::vector<int32_t>>();
  auto tok = Tokenizer::from_hf_file(tj);
  EXPECT_EQ(ids, tok->encode(text));
  CliResult dec = run_cli("tokenize --decode --model " + tj, nlohmann::json(ids).dump());
  ASSERT_EQ(dec.status, 0) << dec.out;
  EXPECT_EQ(dec.out, text);
}

TEST(Cli, InvalidUtf8PromptIsAClearError) {
  RK_REQUIRE_SHARED("models/stories260K/stories260K.gguf");
  CliResult r = run_cli("generate --model " + shared_path("models/stories260K/stories260K.gguf") +
                        " --prompt \"$(printf 'abc\\377\\376')\" --max-tokens 2");
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("UTF-8"), std::string::npos) << r.out;
}

TEST(Cli, BadInputsAreClearErrors) {
  RK_REQUIRE_SHARED("refs/qwen2-tiny");
  CliResult missing = run_cli("generate --model /nonexistent/model --prompt-ids 1");
  EXPECT_EQ(missing.status, 1) << missing.out;
  EXPECT_NE(missing.out.find("/nonexistent/model"), std::string::npos) << missing.out;
  CliResult bad_ids =
      run_cli("generate --model " + shared_path("refs/qwen2-tiny") + " --prompt-ids 1,x,3");
  EXPECT_EQ(bad_ids.status, 1) << bad_ids.out;
  CliResult oov =
      run_cli("generate --model " + shared_path("refs/qwen2-tiny") + " --prompt-ids 1,99999");
  EXPECT_EQ(oov.status, 1) << oov.out;
  EXPECT_NE(oov.out.find("99999"), std::string::npos) << oov.out;
  CliResult bad_temp = run_cli("generate --model " + shared_path("refs/qwen2-tiny") +
                               " --prompt-ids 1 --temperature -1");
  EXPECT_EQ(bad_temp.status, 1) << bad_temp.out;
  CliResult bad_json = run_cli(
      "tokenize --decode --model " + shared_path("tokenizers/qwen3/tokenizer.json"), "[1, 2");
  EXPECT_EQ(bad_json.status, 1) << bad_json.out;
}

TEST(Cli, SamplingIsReproducibleBySeed) {
  RK_REQUIRE_SHARED("models/stories260K/stories260K.gguf");
  std::string base =
      "generate --model " + shared_path("models/stories260K/stories260K.gguf") +
      " --prompt-ids 1 --max-tokens 30 --json --temperature 1.0 --top-p 0.9 --top-k 40";
  CliResult a = run_cli(base + " --seed 7"), b = run_cli(base + " --seed 7"),
            c = run_cli(base + " --seed 8");
  ASSERT_EQ(a.status, 0) << a.out;
  auto ja = nlohmann::json::parse(last_line(a.out)), jb = nlohmann::json::parse(last_line(b.out)),
       jc = nlohmann::json::parse(last_line(c.out));
  EXPECT_EQ(ja["ids"], jb["ids"]);
  EXPECT_NE(ja["ids"], jc["ids"]);
}

// The reference-logits file of `eval` holds one record per sample: a run on a subset reads the
// rows it has and adds the rest; the scores do not depend on whether rows were read or computed;
// a damaged file is a clear error, never silently recomputed over.
TEST(Cli, EvalReferenceFileServesAnySubset) {
  const std::string model = std::string(REDKNOT_SOURCE_DIR) + "/models/redknot-rag-8k";
  const std::string dir = ::testing::TempDir();
  auto write_data = [&](const std::string& name, const std::vector<int>& ids) {
    std::ofstream f(dir + "/" + name);
    for (int i : ids)
      f << nlohmann::json{{"id", "s" + std::to_string(i)},
                          {"task", "single"},
                          {"segments",
                           {"The lamp of Orin" + std::to_string(i) + " is blue.",
                            "Mara lives in Tesk. The bus is late on day " + std::to_string(i) +
                                "."}},
                          {"question", "What colour is the lamp of Orin" + std::to_string(i) + "?"},
                          {"answers", {"blue"}}}
               .dump()
        << "\n";
    return dir + "/" + name;
  };
  const std::string ab = write_data("ref_ab.jsonl", {1, 2}),
                    bc = write_data("ref_bc.jsonl", {2, 3});
  const std::string ref = dir + "/ref_cache.bin";
  std::remove(ref.c_str());
  const std::string base = "eval --model " + model + " --mode naive --json --max-answer-tokens 2";
  CliResult first = run_cli(base + " --data " + ab + " --reference " + ref);
  ASSERT_EQ(first.status, 0) << first.out;
  EXPECT_NE(first.out.find("0 of 2 samples read"), std::string::npos) << first.out;
  CliResult second = run_cli(base + " --data " + bc + " --reference " + ref);
  ASSERT_EQ(second.status, 0) << second.out;
  EXPECT_NE(second.out.find("1 of 2 samples read"), std::string::npos) << second.out;
  CliResult third = run_cli(base + " --data " + bc + " --reference " + ref);
  ASSERT_EQ(third.status, 0) << third.out;
  EXPECT_NE(third.out.find("2 of 2 samples read"), std::string::npos) << third.out;
  // Scores from read rows equal scores from computed ones (no reference at all).
  CliResult fresh = run_cli(base + " --data " + bc);
  ASSERT_EQ(fresh.status, 0) << fresh.out;
  auto jt = nlohmann::json::parse(last_line(third.out)),
       jf = nlohmann::json::parse(last_line(fresh.out));
  EXPECT_EQ(jt["top1_match"], jf["top1_match"]);
  EXPECT_EQ(jt["logits_cos"], jf["logits_cos"]);
  EXPECT_EQ(jt["em"], jf["em"]);
  // A truncated file is an error naming it; the file is left as it was.
  std::string bytes;
  {
    std::ifstream in(ref, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  ASSERT_GT(bytes.size(), 100u);
  std::ofstream(ref, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 100);
  CliResult damaged = run_cli(base + " --data " + bc + " --reference " + ref);
  EXPECT_NE(damaged.status, 0);
  EXPECT_NE(damaged.out.find("truncated reference logits"), std::string::npos) << damaged.out;
  std::ifstream in(ref, std::ios::binary | std::ios::ate);
  EXPECT_EQ(static_cast<size_t>(in.tellg()), bytes.size() - 100);
}

// serve and generate without reuse flags run with the model directory's reuse_settings.json;
// flags override it field by field; a bad file is an error naming it.
TEST(Cli, ReuseSettingsComeFromTheModelDirectory) {
  const std::string model = std::string(REDKNOT_SOURCE_DIR) + "/models/redknot-rag-8k";
  const std::vector<double> shipped = {1, 1, 0.4, 0.4, 0.7, 0.5, 0.5, 0.5};
  for (const std::string cmd : {"serve", "generate --mode redknot"}) {
    CliResult r = run_cli(cmd + " --model " + model + " --print-config");
    ASSERT_EQ(r.status, 0) << cmd << ": " << r.out;
    auto j = nlohmann::json::parse(last_line(r.out));
    EXPECT_EQ(j["source"], model + "/reuse_settings.json") << cmd;
    EXPECT_EQ(j["layer_mass"].get<std::vector<double>>(), shipped) << cmd;
    EXPECT_EQ(j["ffn_dilate"], 1) << cmd;
    EXPECT_EQ(j["head_profile"], model + "/head_profile.json") << cmd;
    EXPECT_EQ(j["kv_head_profile"], model + "/head_profile.json") << cmd;

    CliResult o = run_cli(cmd + " --model " + model + " --print-config --ffn-dilate 0");
    ASSERT_EQ(o.status, 0) << cmd << ": " << o.out;
    auto jo = nlohmann::json::parse(last_line(o.out));
    EXPECT_EQ(jo["ffn_dilate"], 0) << cmd;
    EXPECT_EQ(jo["layer_mass"].get<std::vector<double>>(), shipped) << cmd;
    EXPECT_EQ(jo["source"], model + "/reuse_settings.json + command line") << cmd;
  }
  // The baselines run on the model's own attention whatever profile the settings name, in
  // every command; plain serving (no reuse) keeps the profile.
  for (const std::string cmd : {"generate --mode naive", "generate --mode cacheblend --segment x",
                                "serve --reuse-mode epic", "serve --reuse-mode naive"}) {
    CliResult r = run_cli(cmd + " --model " + model + " --print-config");
    ASSERT_EQ(r.status, 0) << cmd << ": " << r.out;
    EXPECT_EQ(nlohmann::json::parse(last_line(r.out))["kv_head_profile"], "") << cmd;
  }
  CliResult off = run_cli("serve --reuse-mode off --model " + model + " --print-config");
  ASSERT_EQ(off.status, 0) << off.out;
  EXPECT_EQ(nlohmann::json::parse(last_line(off.out))["kv_head_profile"],
            model + "/head_profile.json");

  const std::string bad = ::testing::TempDir() + "/bad_settings_model";
  std::filesystem::create_directories(bad);
  std::ofstream(bad + "/reuse_settings.json") << R"({"layer_mass": [1], "typo": 1})";
  CliResult e = run_cli("serve --model " + bad + " --print-config");
  EXPECT_NE(e.status, 0);
  EXPECT_NE(e.out.find(bad + "/reuse_settings.json"), std::string::npos) << e.out;
  EXPECT_NE(e.out.find("unknown key \"typo\""), std::string::npos) << e.out;
}

}  // namespace
}  // namespace redknot::testing
