// reuse_settings.json: strict parsing (good file, malformed JSON, unknown key, wrong type), the
// flag overlay, and the shipped model's file.
#include "engine/reuse_settings.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "reuse/reuse_prefill.h"

namespace redknot {
namespace {

namespace fs = std::filesystem;

std::string write_settings(const std::string& name, const std::string& text) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("reuse_settings_" + name);
  fs::create_directories(dir);
  const fs::path p = dir / kReuseSettingsFile;
  std::ofstream(p) << text;
  return p.string();
}

void expect_error(const std::string& text, const std::string& needle) {
  const std::string path = write_settings(needle.substr(0, 8), text);
  try {
    load_reuse_settings(path);
    FAIL() << "accepted: " << text;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

TEST(ReuseSettings, ParsesEveryField) {
  const std::string path = write_settings("good", R"({
    "head_profile": "head_profile.json", "sparse_ffn": true, "dense_until": 2, "mass": 0.8,
    "deep_start": 4, "mass_deep": 0.5, "recent_n": 64, "layer_mass": [1, 1, 0.4],
    "ffn_dilate": 1, "skip_dead_rows": false, "query_full_attention": true})");
  const ReuseSettings s = load_reuse_settings(path);
  EXPECT_EQ(s.source, path);
  // A relative head profile sits beside the settings file.
  EXPECT_EQ(*s.head_profile, (fs::path(path).parent_path() / "head_profile.json").string());
  ReuseOptions o;
  s.apply(o);
  EXPECT_TRUE(o.sparse_ffn_enabled);
  EXPECT_EQ(o.sparse_ffn.dense_until, 2);
  EXPECT_DOUBLE_EQ(o.sparse_ffn.mass, 0.8);
  EXPECT_EQ(o.sparse_ffn.deep_start, 4);
  EXPECT_DOUBLE_EQ(o.sparse_ffn.mass_deep, 0.5);
  EXPECT_EQ(o.sparse_ffn.recent_n, 64);
  EXPECT_EQ(o.sparse_ffn.layer_mass, (std::vector<double>{1, 1, 0.4}));
  EXPECT_EQ(o.sparse_ffn.dilate, 1);
  EXPECT_FALSE(o.skip_dead_rows);
  EXPECT_TRUE(o.query_full_attention);
}

TEST(ReuseSettings, RejectsMalformedUnknownAndWrongTypes) {
  expect_error(R"({"layer_mass": [1, 1)", "not valid JSON");
  expect_error(R"({"layer_mass": [1], "dilate": 1})", "unknown key \"dilate\"");
  expect_error(R"({"ffn_dilate": "1"})", "\"ffn_dilate\" must be an integer");
  expect_error(R"({"layer_mass": [1, "x"]})", "\"layer_mass\" must be a number");
  expect_error(R"({"sparse_ffn": 1})", "\"sparse_ffn\" must be true or false");
  expect_error(R"({"mass": 1.5})", "\"mass\" out of range");
  expect_error(R"([1, 2])", "top level must be an object");
  EXPECT_THROW(load_reuse_settings("/nonexistent/reuse_settings.json"), Error);
}

// Calibration's fields: a refused redknot mode with its reason, the measured guard kept as
// written; saving and loading again gives the same settings.
TEST(ReuseSettings, CalibrationFieldsRoundTrip) {
  const std::string path = write_settings("calibrated", R"({
    "head_profile": "head_profile.json", "layer_mass": [1, 0.5], "ffn_dilate": 1,
    "calibration": {"guard": {"target_top1": 0.99, "max_em_drop": 1}}})");
  const ReuseSettings s = load_reuse_settings(path);
  EXPECT_FALSE(s.redknot_disabled.has_value());
  EXPECT_EQ(s.refusal(ReuseMode::RedKnot), "");
  ASSERT_TRUE(s.calibration.has_value());
  EXPECT_EQ((*s.calibration)["guard"]["target_top1"], 0.99);

  const std::string off = write_settings("disabled", R"({"redknot": "disabled",
    "redknot_disabled_reason": "no setting met the guard",
    "calibration": {"guard": {"target_top1": 1, "max_em_drop": -100}}})");
  const ReuseSettings d = load_reuse_settings(off);
  ASSERT_TRUE(d.redknot_disabled.has_value());
  EXPECT_EQ(*d.redknot_disabled, "no setting met the guard");
  const std::string why = d.refusal(ReuseMode::RedKnot);
  EXPECT_NE(why.find(off), std::string::npos) << why;
  EXPECT_NE(why.find("no setting met the guard"), std::string::npos) << why;
  EXPECT_EQ(d.refusal(ReuseMode::Naive), "");  // the baselines are not calibrated
  EXPECT_EQ(d.refusal(ReuseMode::Full), "");
  EXPECT_FALSE(d.head_profile.has_value());

  const std::string again = write_settings("resaved", "{}");
  save_reuse_settings(again, d);
  const ReuseSettings r = load_reuse_settings(again);
  EXPECT_EQ(r.redknot_disabled, d.redknot_disabled);
  EXPECT_EQ(r.calibration, d.calibration);
  EXPECT_EQ(reuse_settings_to_json(r), reuse_settings_to_json(d));

  expect_error(R"({"redknot": "off"})", "\"redknot\" must be");
  expect_error(R"({"redknot_disabled_reason": "x"})", "needs \"redknot\": \"disabled\"");
  expect_error(R"({"calibration": 1})", "\"calibration\" must be an object");
}

TEST(ReuseSettings, FlagsOverrideFieldByField) {
  ReuseSettings file;
  file.source = "model/reuse_settings.json";
  file.layer_mass = std::vector<double>{1, 0.5};
  file.ffn_dilate = 1;
  ReuseSettings flags;
  flags.source = "command line";
  flags.ffn_dilate = 0;
  const ReuseSettings s = file.overlay(flags);
  EXPECT_EQ(*s.layer_mass, (std::vector<double>{1, 0.5}));
  EXPECT_EQ(*s.ffn_dilate, 0);
  EXPECT_EQ(s.source, "model/reuse_settings.json + command line");
  EXPECT_EQ(file.overlay(ReuseSettings{}).source, file.source);  // no flags: the file alone
  // Tier flags replace the file's per-layer masses, which would otherwise hide them.
  ReuseSettings tiers;
  tiers.mass = 0.8;
  const ReuseSettings t = file.overlay(tiers);
  EXPECT_FALSE(t.layer_mass.has_value());
  EXPECT_EQ(*t.mass, 0.8);
  EXPECT_EQ(*t.ffn_dilate, 1);
}

TEST(ReuseSettings, ShippedModelHasItsTunedSetting) {
  const std::string dir = std::string(REDKNOT_SOURCE_DIR) + "/models/redknot-rag-8k";
  const ReuseSettings s = model_reuse_settings(dir);
  ASSERT_FALSE(s.empty());
  EXPECT_EQ(*s.head_profile, dir + "/head_profile.json");
  EXPECT_TRUE(fs::exists(*s.head_profile));
  EXPECT_EQ(*s.layer_mass, (std::vector<double>{1, 1, 0.4, 0.4, 0.7, 0.5, 0.5, 0.5}));
  EXPECT_EQ(*s.ffn_dilate, 1);
  // The CPU step budget (docs/benchmarks.md: within 1.5 EM of full prefill on every family, and
  // running streams do not stall behind a new document).
  ASSERT_TRUE(s.reuse_chunk.has_value());
  EXPECT_EQ(*s.reuse_chunk, 512);
  ReuseOptions ro;
  s.apply(ro);
  EXPECT_EQ(ro.chunk, 512);
  EXPECT_TRUE(model_reuse_settings("/nonexistent/model").empty());
}

}  // namespace
}  // namespace redknot
