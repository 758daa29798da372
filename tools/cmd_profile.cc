// `redknot profile`: the offline head profiler — classifies every (layer, kv head) as global or
// local from calibration text and writes the head profile JSON for --head-profile.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "engine/profiler.h"

namespace redknot::cli {

namespace {
struct ProfileArgs {
  std::string model, out, backend = "cpu";
  std::vector<std::string> calib, calib_ids;
  double ratio = 0.15;
  int32_t window = 512, sink = 4, dense_layers = 0, max_tokens = 2048, prefixes = 2, max_chunks = 8,
          threads = 0;
  std::optional<double> score_threshold;
  std::string bos = "auto";  // auto | always | never
  bool quiet = false;
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open calibration file");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw Error(path + ": read failed");
  return s;
}

// A JSON list of ids, or a list of such lists (one per document).
std::vector<std::vector<int32_t>> read_id_file(const std::string& path) {
  const std::string text = read_file(path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    throw Error(path + ": calibration ids are not valid JSON: " + e.what());
  }
  auto as_ids = [&](const nlohmann::json& a) {
    if (!a.is_array()) throw Error(path + ": expected a JSON list of token ids");
    std::vector<int32_t> ids;
    for (const auto& v : a) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
        throw Error(path + ": '" + v.dump() + "' is not a token id");
      ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    return ids;
  };
  if (j.is_array() && !j.empty() && j[0].is_array()) {
    std::vector<std::vector<int32_t>> docs;
    for (const auto& d : j) docs.push_back(as_ids(d));
    return docs;
  }
  return {as_ids(j)};
}

int run_profile(const ProfileArgs& a) {
  // Check the inputs before the (slower) model load.
  std::vector<std::string> texts;
  for (const auto& f : a.calib) texts.push_back(read_file(f));
  std::vector<std::vector<int32_t>> docs;
  for (const auto& f : a.calib_ids)
    for (auto& d : read_id_file(f)) docs.push_back(std::move(d));

  LoadedModel m = load_model(a.model, a.backend);
  ProfileOptions o;
  o.ratio = a.ratio, o.window = a.window, o.sink = a.sink, o.dense_layers = a.dense_layers;
  o.max_tokens = a.max_tokens, o.num_prefixes = a.prefixes, o.max_chunks = a.max_chunks;
  o.num_threads = a.threads;
  o.score_threshold = a.score_threshold;
  nlohmann::json files = nlohmann::json::array();
  if (!texts.empty()) {
    if (!m.tokenizer)
      throw Error(a.model + ": no tokenizer found to tokenize --calib; use --calib-ids");
    for (size_t i = 0; i < texts.size(); ++i) {
      docs.push_back(m.tokenizer->encode(texts[i], /*add_special=*/false));
      files.push_back({{"path", a.calib[i]}, {"tokens", docs.back().size()}});
    }
    // Runs start the way the model sees text: with BOS when its tokenizer adds one (auto), or
    // when the application adds it by hand (always; e.g. the RAG model's prompts). Without its
    // sink token a run's first tokens become the sink, which inflates the prefix-shift score of
    // sink-heavy local heads.
    if (a.bos == "always" || (a.bos == "auto" && m.tokenizer->add_bos())) {
      if (m.tokenizer->bos_id() < 0) {
        if (a.bos == "always") throw Error(a.model + ": --bos always but the tokenizer has no BOS");
      } else {
        o.bos_id = m.tokenizer->bos_id();
      }
    }
  }
  for (size_t i = 0; i < a.calib_ids.size(); ++i) files.push_back({{"path", a.calib_ids[i]}});
  o.calibration_info = {{"files", files}};
  o.warn = [](const std::string& w) { std::cerr << "warning: " << w << "\n"; };
  const auto t0 = std::chrono::steady_clock::now();
  auto secs = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  if (!a.quiet)
    o.progress = [&](const ProfileProgress& p) {
      const std::string what =
          p.prefix ? "prefix " + std::to_string(p.prefix) + "/" + std::to_string(p.num_prefixes)
                   : std::string("alone");
      std::fprintf(stderr, "profile: run %d/%d (chunk %d/%d %s, %d tokens) %.1f s\n", p.run,
                   p.total_runs, p.chunk, p.num_chunks, what.c_str(), p.tokens, secs());
    };
  HeadProfile prof = profile_heads(*m.model, docs, o);
  prof.params["model"] = a.model;
  prof.save(a.out);

  const int64_t pairs = int64_t{prof.num_layers()} * prof.num_kv_heads();
  const int64_t globals = std::llround(prof.global_fraction() * static_cast<double>(pairs));
  std::printf("%lld of %lld heads global (%.1f%%), window %d, sink %d; %.1f s\n",
              static_cast<long long>(globals), static_cast<long long>(pairs),
              100.0 * prof.global_fraction(), a.window, a.sink, secs());
  for (const std::string& row : profile_class_map(prof)) std::printf("%s\n", row.c_str());
  std::printf("wrote %s\n", a.out.c_str());
  return 0;
}
}  // namespace

void add_profile_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<ProfileArgs>();
  CLI::App* c = app.add_subcommand("profile", "Classify attention heads as global/local");
  c->add_option("--model", a->model, "HF model directory or GGUF file")->required();
  c->add_option("--calib", a->calib, "calibration text file(s), tokenized with the model's");
  c->add_option("--calib-ids", a->calib_ids,
                "calibration token ids: JSON list (or list of lists), used as given");
  c->add_option("--out", a->out, "head profile JSON to write")->required();
  c->add_option("--ratio", a->ratio, "fraction of kv heads made global")
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--window", a->window, "local window W")->check(CLI::Range(1, 1 << 30));
  c->add_option("--sink", a->sink, "local sink tokens")->check(CLI::Range(0, 1 << 30));
  c->add_option("--dense-layers", a->dense_layers, "first N layers forced global")
      ->check(CLI::Range(0, 4096));
  c->add_option("--max-tokens", a->max_tokens, "longest run (prefix + chunk)")
      ->check(CLI::Range(17, 1 << 20));
  c->add_option("--prefixes", a->prefixes, "unrelated prefixes per chunk")
      ->check(CLI::Range(1, 64));
  c->add_option("--max-chunks", a->max_chunks, "calibration chunks profiled (0: all)")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option("--score-threshold", a->score_threshold,
                "heads scoring at least this are global whatever the ratio");
  c->add_option("--threads", a->threads, "host threads for attention maps (0: all)");
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  c->add_option(
       "--bos", a->bos,
       "start each calibration run with BOS: auto (as the tokenizer adds it) | always | never")
      ->check(CLI::IsMember({"auto", "always", "never"}));
  c->add_flag("--quiet", a->quiet, "no progress lines");
  c->callback([a, &action] {
    if (a->calib.empty() && a->calib_ids.empty())
      throw CLI::ValidationError("--calib or --calib-ids is required");
    action = [a] { return run_profile(*a); };
  });
}

}  // namespace redknot::cli
