// `redknot make-profile`: a head profile at one of the paper's layouts (spread | deep | front),
// without calibration, in the format `redknot profile` writes (loads with --head-profile).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>

#include "commands.h"
#include "core/error.h"
#include "engine/profiler.h"
#include "kv/layout_profile.h"
#include "loader/hf_config.h"
#include "loader/model_shapes.h"

namespace redknot::cli {

namespace {
struct MakeProfileArgs {
  std::string model, config, out;
  LayoutProfileOptions o;
  bool quiet = false;
};

int run_make_profile(const MakeProfileArgs& a) {
  ModelConfig cfg;
  std::string source;
  if (!a.model.empty()) {
    namespace fs = std::filesystem;
    fs::path p(a.model);
    if (fs::is_directory(p)) p /= "config.json";
    if (!fs::is_regular_file(p))
      throw Error(a.model + ": no config.json (make-profile reads HF model directories)");
    cfg = read_hf_config(p.string());
    source = a.model;
  } else {
    cfg = parse_hf_config(model_shape_config(a.config), a.config);
    cfg.validate(a.config);
    source = a.config;
  }
  HeadProfile prof = make_layout_profile(cfg, a.o);
  prof.params["model"] = source;
  prof.save(a.out);

  const int64_t pairs = int64_t{prof.num_layers()} * prof.num_kv_heads();
  const int64_t globals = prof.params["global_heads"].get<int64_t>();
  std::printf("%s layout: %lld of %lld heads global (%.1f%%) in layers %s, window %d, sink %d\n",
              a.o.layout.c_str(), static_cast<long long>(globals), static_cast<long long>(pairs),
              100.0 * static_cast<double>(globals) / static_cast<double>(pairs),
              prof.params["global_layers"].dump().c_str(), a.o.window, a.o.sink);
  if (!a.quiet)
    for (const std::string& row : profile_class_map(prof)) std::printf("%s\n", row.c_str());
  std::printf("wrote %s\n", a.out.c_str());
  return 0;
}
}  // namespace

void add_make_profile_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<MakeProfileArgs>();
  CLI::App* c = app.add_subcommand(
      "make-profile", "Write a head profile at a fixed layout (spread | deep | front)");
  c->add_option("--model", a->model, "HF model directory (its config.json gives the shape)");
  c->add_option("--config", a->config, "or a known shape: " + model_shape_names());
  c->add_option("--layout", a->o.layout,
                "spread: every layer | deep: last quarter of the layers | front: first quarter")
      ->required()
      ->check(CLI::IsMember({"spread", "deep", "front"}));
  c->add_option("--global-ratio", a->o.ratio, "fraction of kv heads made global")
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--window", a->o.window, "local window W")->check(CLI::Range(1, 1 << 30));
  c->add_option("--sink", a->o.sink, "local sink tokens")->check(CLI::Range(0, 1 << 30));
  c->add_option("--seed", a->o.seed, "picks which heads of a layer are global");
  c->add_option("--out", a->out, "head profile JSON to write")->required();
  c->add_flag("--quiet", a->quiet, "no per-layer map");
  c->callback([a, &action] {
    if (a->model.empty() == a->config.empty())
      throw CLI::ValidationError("give exactly one of --model DIR or --config NAME");
    action = [a] { return run_make_profile(*a); };
  });
}

}  // namespace redknot::cli
