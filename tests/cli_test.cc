// The `redknot` binary end to end: generate (--json, --logits-out), tokenize, and clear errors
// with a non-zero exit on bad input.
#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

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

}  // namespace
}  // namespace redknot::testing
