// `redknot calibrate` end to end on the shipped model (CPU) with the committed CI calibration
// slices (data/calib/ci-*.jsonl.gz: gen_data.py seeds 2611 and 2612, 1K and 2K tokens, one sample
// per task family; never used for training, the eval set or the docs' numbers): it writes a
// setting that generate and serve then run with, and refuses a guard no setting can meet.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "test_support.h"

namespace redknot::testing {
namespace {

namespace fs = std::filesystem;

std::string last_line(const std::string& s) {
  const size_t end = s.find_last_not_of('\n');
  const size_t start = s.rfind('\n', end);
  return s.substr(start == std::string::npos ? 0 : start + 1,
                  end - (start == std::string::npos ? 0 : start + 1) + 1);
}

// A model directory of its own (links to the shipped weights and tokenizer, no settings), so
// calibrate writes beside it and serve / generate read it by default.
std::string model_copy(const std::string& name) {
  const fs::path src = fs::path(REDKNOT_SOURCE_DIR) / "models/redknot-rag-8k";
  const fs::path dir = fs::path(::testing::TempDir()) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* f : {"config.json", "generation_config.json", "model.safetensors",
                        "tokenizer.json", "tokenizer_config.json"})
    fs::create_symlink(src / f, dir / f);
  return dir.string();
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

const std::string kCalib = std::string(REDKNOT_SOURCE_DIR) + "/data/calib/ci-1k.jsonl.gz " +
                           std::string(REDKNOT_SOURCE_DIR) + "/data/calib/ci-2k.jsonl.gz";
// The quick grid, with the profiler on short runs: 8 samples, at most 10 settings measured.
const std::string kQuick =
    " --grid quick --profile-max-tokens 1024 --profile-chunks 2 --quiet --calib " + kCalib;

TEST(CalibrateCli, WritesASettingThatServeAndGenerateUse) {
  const std::string model = model_copy("calibrated_model");
  const std::string plot = ::testing::TempDir() + "/calibration_quick.png";
  CliResult r = run_cli("calibrate --model " + model + kQuick +
                        " --target-top1 0.75 --max-em-drop 25 --plot " + plot);
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("| # | stage | ratio |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("**pass, chosen**"), std::string::npos) << r.out;

  const nlohmann::json s = read_json(model + "/reuse_settings.json");
  ASSERT_TRUE(s.contains("head_profile")) << s.dump();
  EXPECT_EQ(s["head_profile"], "head_profile.json");
  EXPECT_FALSE(s.contains("redknot")) << s.dump();
  const nlohmann::json& result = s["calibration"]["result"];
  ASSERT_TRUE(result.is_object()) << s.dump();
  EXPECT_TRUE(result["pass"].get<bool>());
  EXPECT_GE(result["top1"].get<double>(), 0.75);
  EXPECT_LE(100 * (s["calibration"]["full"]["em"].get<double>() - result["em"].get<double>()),
            25.0 + 1e-9);
  EXPECT_EQ(s["calibration"]["guard"]["target_top1"], 0.75);
  EXPECT_EQ(s["calibration"]["samples"], 8);
  // The head profile written is the measured cut: its ratio and window are the result's.
  const nlohmann::json hp = read_json(model + "/head_profile.json");
  EXPECT_EQ(hp["params"]["ratio"], result["ratio"]);
  EXPECT_EQ(hp["params"]["window"], result["window"]);
  EXPECT_EQ(hp["params"]["sink"], result["sink"]);
  // Every cut's heads were ranked at the grid's smallest window (the window only widens what the
  // local heads read), and the record says so.
  const nlohmann::json& windows = s["calibration"]["grid"]["values"]["windows"];
  ASSERT_TRUE(windows.is_array() && !windows.empty()) << s.dump();
  int64_t smallest = windows[0].get<int64_t>();
  for (const auto& w : windows) smallest = std::min(smallest, w.get<int64_t>());
  EXPECT_EQ(s["calibration"]["grid"]["rank_window"], smallest);
  EXPECT_EQ(hp["params"]["rank_window"], smallest);
  // The plot is a PNG.
  std::ifstream png(plot, std::ios::binary);
  char sig[8] = {};
  png.read(sig, 8);
  EXPECT_EQ(std::string(sig + 1, 3), "PNG");

  // serve and generate run with what was written, field for field.
  for (const std::string cmd : {"serve", "generate --mode redknot"}) {
    CliResult c = run_cli(cmd + " --model " + model + " --print-config");
    ASSERT_EQ(c.status, 0) << cmd << ": " << c.out;
    const nlohmann::json j = nlohmann::json::parse(last_line(c.out));
    EXPECT_EQ(j["source"], model + "/reuse_settings.json") << cmd;
    EXPECT_EQ(j["redknot"], "enabled") << cmd;
    EXPECT_EQ(j["head_profile"], model + "/head_profile.json") << cmd;
    EXPECT_EQ(j["kv_head_profile"], model + "/head_profile.json") << cmd;
    EXPECT_EQ(j["sparse_ffn"], s["sparse_ffn"]) << cmd;
    if (s["sparse_ffn"].get<bool>()) {
      EXPECT_EQ(j["layer_mass"], s["layer_mass"]) << cmd;
      EXPECT_EQ(j["ffn_dilate"], s["ffn_dilate"]) << cmd;
    }
    EXPECT_EQ(j["reuse_chunk"], s["reuse_chunk"]) << cmd;
    EXPECT_EQ(j["calibration"]["result"], result) << cmd;
  }
}

// Top-1 agreement 1.0 and an EM *gain* of 100 points over full prefill: a setting would need EM
// >= full EM + 100, which no setting reaches once full prefill answers anything right (EM is at
// most 100). The test checks that full prefill did, so the guard is unmeetable, not just unmet.
TEST(CalibrateCli, RefusesAGuardNoSettingCanMeet) {
  const std::string model = model_copy("refused_model");
  CliResult r =
      run_cli("calibrate --model " + model + kQuick + " --target-top1 1 --max-em-drop -100");
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("refused to enable redknot"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("no setting met the guard"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("**pass, chosen**"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(model + "/head_profile.json"));

  const nlohmann::json s = read_json(model + "/reuse_settings.json");
  EXPECT_GT(s["calibration"]["full"]["em"].get<double>(), 0.0) << s.dump();
  EXPECT_EQ(s["redknot"], "disabled");
  EXPECT_NE(s["redknot_disabled_reason"].get<std::string>().find("no setting met the guard"),
            std::string::npos);
  EXPECT_FALSE(s.contains("head_profile"));
  EXPECT_TRUE(s["calibration"]["result"].is_null());

  // Nothing runs redknot on this model silently: serve says it is disabled (and serves such
  // requests with full prefill, reported; tests/serving_reuse_test.cc), generate and eval refuse.
  CliResult cfg = run_cli("serve --model " + model + " --print-config");
  ASSERT_EQ(cfg.status, 0) << cfg.out;
  const nlohmann::json j = nlohmann::json::parse(last_line(cfg.out));
  EXPECT_EQ(j["redknot"], "disabled");
  EXPECT_EQ(j["kv_head_profile"], "");
  CliResult gen = run_cli("generate --model " + model +
                          " --mode redknot --segment 'A doc.' --prompt 'Q' --max-tokens 1");
  EXPECT_NE(gen.status, 0);
  EXPECT_NE(gen.out.find("redknot mode is disabled"), std::string::npos) << gen.out;
  CliResult ev = run_cli("eval --model " + model + " --data " + std::string(REDKNOT_SOURCE_DIR) +
                         "/data/calib/ci-1k.jsonl.gz --n 1 --mode full,redknot");
  EXPECT_NE(ev.status, 0);
  EXPECT_NE(ev.out.find("redknot mode is disabled"), std::string::npos) << ev.out;
}

}  // namespace
}  // namespace redknot::testing
