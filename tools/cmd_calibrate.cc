// `redknot calibrate`: profiles the heads on calibration samples, searches the reuse settings
// (head cut, Sparse FFN masses, dilation; eval/calibrate.h) against full prefill with the eval
// harness, and writes the fastest setting meeting the accuracy guard to the model directory
// (head_profile.json + reuse_settings.json), or refuses: reuse_settings.json then disables
// redknot mode and says why, and the command exits 2.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "engine/profiler.h"
#include "eval/calibrate.h"
#include "eval/calibration_plot.h"
#include "eval/rag_eval.h"

namespace redknot::cli {

namespace {

namespace fs = std::filesystem;

struct CalibrateArgs {
  std::string model, out, plot, backend = "cpu", grid = "default";
  std::vector<std::string> calib;
  int64_t n = 0;  // samples per file (0: all)
  CalibGuard guard;
  // Grid overrides (empty: the named grid's).
  std::vector<double> ratios, masses;
  std::vector<int32_t> windows, sinks, dilates;
  int32_t max_evals = 0;
  int32_t profile_max_tokens = 2048, profile_chunks = 4, profile_prefixes = 2;
  // Window the heads are ranked at (0: the grid's smallest; -1: each window its own ranking).
  int32_t rank_window = 0;
  std::optional<int32_t> reuse_chunk;
  int32_t max_answer_tokens = 16;
  bool json = false, quiet = false;
};

// Calibration data: each file's samples, and what they span (lengths, task families), recorded
// with the result so a setting says what it was calibrated on.
struct CalibData {
  std::vector<RagSample> samples;
  nlohmann::json files = nlohmann::json::array();
  int64_t min_tokens = 0, max_tokens = 0;
};

CalibData load_calibration(const CalibrateArgs& a, const Tokenizer& tok) {
  CalibData d;
  for (const std::string& path : a.calib) {
    if (path.find("/data/eval/") != std::string::npos)
      std::cerr << "warning: " << path
                << " looks like an evaluation set; calibrating on it makes its eval numbers "
                   "optimistic (use held-out samples, e.g. gen_data.py with another seed)\n";
    std::vector<RagSample> s = load_rag_dataset(path, a.n);
    int64_t lo = INT64_MAX, hi = 0;
    std::map<std::string, int64_t> tasks;
    for (const RagSample& r : s) {
      const int64_t t = build_rag_prompt(tok, r).total_tokens();
      lo = std::min(lo, t), hi = std::max(hi, t);
      ++tasks[r.task.empty() ? "all" : r.task];
    }
    d.files.push_back({{"path", path},
                       {"samples", s.size()},
                       {"prompt_tokens_min", lo},
                       {"prompt_tokens_max", hi},
                       {"tasks", tasks}});
    d.min_tokens = d.samples.empty() ? lo : std::min(d.min_tokens, lo);
    d.max_tokens = std::max(d.max_tokens, hi);
    d.samples.insert(d.samples.end(), s.begin(), s.end());
  }
  // A setting holds for the lengths and document mixes it was measured on.
  if (d.max_tokens < 2 * d.min_tokens)
    std::cerr << "note: calibration prompts span " << d.min_tokens << "-" << d.max_tokens
              << " tokens; give several --calib files (other lengths, task mixes) for a setting "
                 "that holds across the prompts you serve\n";
  return d;
}

// The profiler's input: each sample's prompt (without its BOS: the profiler starts every run
// with it) and its answer, so retrieval heads see a question look back at the documents.
std::vector<std::vector<int32_t>> profile_docs(const std::vector<RagSample>& samples,
                                               const Tokenizer& tok) {
  std::vector<std::vector<int32_t>> docs;
  for (const RagSample& s : samples) {
    const SegmentedPrompt p = build_rag_prompt(tok, s);
    std::vector<int32_t> ids;
    for (const auto& seg : p.segments) ids.insert(ids.end(), seg.begin(), seg.end());
    ids.insert(ids.end(), p.query.begin(), p.query.end());
    if (!ids.empty() && ids.front() == tok.bos_id()) ids.erase(ids.begin());
    if (!s.answers.empty()) {
      const std::vector<int32_t> ans = tok.encode(" " + s.answers.front() + "\n\n");
      ids.insert(ids.end(), ans.begin(), ans.end());
    }
    docs.push_back(std::move(ids));
  }
  return docs;
}

// Removes the scratch directory of candidate head profiles however the command ends.
struct ScratchDir {
  fs::path path;
  ScratchDir() {
    path = fs::temp_directory_path() / ("redknot-calibrate-" + std::to_string(::getpid()));
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

int run_calibrate(const CalibrateArgs& a) {
  CalibGrid grid = calibration_grid(a.grid);
  if (!a.ratios.empty()) grid.ratios = a.ratios;
  if (!a.windows.empty()) grid.windows = a.windows;
  if (!a.sinks.empty()) grid.sinks = a.sinks;
  if (!a.masses.empty()) grid.mass_ladder = a.masses;
  if (!a.dilates.empty()) grid.dilates = a.dilates;
  if (a.max_evals > 0) grid.max_evals = a.max_evals;
  std::sort(grid.mass_ladder.rbegin(), grid.mass_ladder.rend());  // the walk goes down
  check_grid(grid);
  if (a.out.empty() && !fs::is_directory(a.model))
    throw Error(a.model + " is not a model directory: give --out DIR for the settings");
  const fs::path out = a.out.empty() ? fs::path(a.model) : fs::path(a.out);
  fs::create_directories(out);
  const std::string plot = a.plot.empty() ? (out / "calibration.png").string() : a.plot;
  const auto t0 = std::chrono::steady_clock::now();
  auto secs = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };

  LoadedModel m = load_model(a.model, a.backend);
  if (!m.tokenizer) throw Error(a.model + ": no tokenizer found (calibration prompts are text)");
  const Tokenizer& tok = *m.tokenizer;
  Model& model = *m.model;
  const ModelConfig& cfg = model.config();
  const CalibData data = load_calibration(a, tok);

  // What the search does not set keeps the model's tuned values (reuse_chunk, recent_n, the
  // pass options): the settings are measured as serve will run them. reuse_chunk is always
  // written (Sparse FFN ranks rows per forward): the model's, else serve's default step budget.
  const ReuseSettings base = model_reuse_settings(a.model);
  ReuseSettings keep;
  keep.reuse_chunk = a.reuse_chunk      ? *a.reuse_chunk
                     : base.reuse_chunk ? *base.reuse_chunk
                                        : default_prefill_chunk(a.backend);
  keep.recent_n = base.recent_n;
  keep.skip_dead_rows = base.skip_dead_rows;
  keep.query_full_attention = base.query_full_attention;

  auto eval_options = [&](ReuseMode mode, const ReuseSettings& s,
                          std::vector<std::vector<float>>* full_logits) {
    EvalOptions o;
    o.reuse.mode = mode;
    s.apply(o.reuse);
    o.kv.head_profile_path = s.head_profile.value_or("");
    o.max_answer_tokens = a.max_answer_tokens;
    o.full_logits = full_logits;
    return o;
  };
  auto progress = [&](const std::string& what) {
    return [&a, what](int64_t done, int64_t total) {
      if (!a.quiet)
        std::fprintf(stderr, "\r[calibrate] %s %lld/%lld", what.c_str(), (long long)done,
                     (long long)total);
    };
  };

  // The reference: full prefill's answers and logits, once.
  std::vector<std::vector<float>> full_logits;
  const EvalReport full =
      run_rag_eval(model, m.ckpt, tok, data.samples,
                   eval_options(ReuseMode::Full, keep, &full_logits), progress("full prefill"));
  if (!a.quiet)
    std::fprintf(stderr, "\n[calibrate] full prefill on %lld samples: EM %.1f, F1 %.1f (%.0f s)\n",
                 (long long)full.n, 100 * full.em, 100 * full.f1, secs());

  // Head scores, measured once per (ranking window, sink) on first use; each (ratio, window)
  // re-cuts them. The ranking window is one for every cut by default (the grid's smallest): a
  // head's mass beyond a wide window, averaged over every query of the profiling text, no longer
  // tells the heads that retrieve far from the rest (a window of 1024 on 4K prompts dropped the
  // second test model's deep retrieval heads and every answer, docs/benchmarks.md), while with
  // one ranking a wider window only lets the same local heads see more.
  const std::vector<std::vector<int32_t>> docs = profile_docs(data.samples, tok);
  const int32_t rank_window = a.rank_window == 0
                                  ? *std::min_element(grid.windows.begin(), grid.windows.end())
                                  : a.rank_window;
  std::map<std::pair<int32_t, int32_t>, HeadProfile> profiled;
  auto profile_options = [&](const CalibSetting& s) {
    ProfileOptions o;
    o.ratio = s.ratio, o.window = s.window, o.sink = s.sink;
    o.max_tokens = a.profile_max_tokens, o.max_chunks = a.profile_chunks;
    o.num_prefixes = a.profile_prefixes;
    o.bos_id = tok.bos_id();
    o.calibration_info = {{"files", data.files}};
    return o;
  };
  auto head_profile = [&](const CalibSetting& s) {
    const ProfileOptions o = profile_options(s);
    const int32_t ranked_at = rank_window < 0 ? s.window : rank_window;
    auto it = profiled.find({ranked_at, s.sink});
    if (it == profiled.end()) {
      if (!a.quiet)
        std::fprintf(stderr, "[calibrate] profiling heads (window %d, sink %d)\n", ranked_at,
                     s.sink);
      ProfileOptions po = o;
      po.window = ranked_at;
      HeadProfile p = profile_heads(model, docs, po);
      p.params["model"] = a.model;
      p.params["rank_window"] = ranked_at;
      it = profiled.emplace(std::make_pair(ranked_at, s.sink), std::move(p)).first;
    }
    HeadProfile p = it->second;
    classify_heads(p, o, cfg.sliding_window);  // local heads get the cut's own window
    return p;
  };
  auto settings_for = [&](const CalibSetting& s, const std::string& profile_path) {
    ReuseSettings r = keep;
    r.head_profile = profile_path;
    r.sparse_ffn = s.sparse_ffn;
    if (s.sparse_ffn) r.layer_mass = s.layer_mass, r.ffn_dilate = s.dilate;
    return r;
  };

  ScratchDir scratch;
  int32_t evals = 0;
  const CalibEvaluate evaluate = [&](const CalibSetting& s) {
    const std::string path = (scratch.path / ("profile_" + std::to_string(evals++) + ".json"));
    head_profile(s).save(path);
    const EvalReport r = run_rag_eval(
        model, m.ckpt, tok, data.samples,
        eval_options(ReuseMode::RedKnot, settings_for(s, path), &full_logits), progress(s.label()));
    CalibMeasure cm;
    cm.em = r.em, cm.f1 = r.f1, cm.top1 = r.top1_match, cm.logits_cos = r.logits_cos;
    cm.flops_saved = r.flops_full > 0 ? 1.0 - r.flops / r.flops_full : 0.0;
    return cm;
  };
  const CalibResult res = search_reuse_settings(
      grid, a.guard, full.em, static_cast<int32_t>(cfg.num_layers), evaluate,
      [&](const CalibPoint& p) {
        if (!a.quiet)
          std::fprintf(stderr,
                       "\r[calibrate %zu] %s: EM %.1f, top-1 %.3f, %.1f%% saved: %s (%.0f s)\n",
                       static_cast<size_t>(evals), p.setting.label().c_str(), 100 * p.measure.em,
                       p.measure.top1, 100 * p.measure.flops_saved,
                       p.pass ? "pass" : ("fail: " + p.fails).c_str(), secs());
      });

  std::printf("%s", calibration_table(res, full.em, full.f1).c_str());
  write_png(plot, plot_calibration(res, a.guard, full.em));

  nlohmann::json calib = {
      {"method", "redknot calibrate (docs/calibrate.md)"},
      {"guard", a.guard.to_json()},
      {"grid", {{"name", a.grid}, {"values", grid.to_json()}, {"rank_window", rank_window}}},
      {"data", data.files},
      {"samples", data.samples.size()},
      {"full", {{"em", full.em}, {"f1", full.f1}}},
      {"settings_tried", res.points.size()},
      {"budget_exhausted", res.budget_exhausted},
      {"result", res.chosen ? res.points[*res.chosen].to_json() : nlohmann::json(nullptr)}};
  const fs::path settings_path = out / kReuseSettingsFile;
  if (!res.chosen) {
    // Nothing that enables redknot: the settings say it is off and why; serve answers redknot
    // requests another way and reports it, generate and eval refuse the mode.
    ReuseSettings off;
    off.redknot_disabled = res.refusal;
    off.calibration = calib;
    save_reuse_settings(settings_path.string(), off);
    if (a.json) std::cout << calib.dump() << "\n";
    std::fprintf(stderr,
                 "calibrate: refused to enable redknot: %s.\nwrote %s (\"redknot\": \"disabled\"), "
                 "plot %s; %.0f s\n",
                 res.refusal.c_str(), settings_path.c_str(), plot.c_str(), secs());
    return 2;
  }
  const CalibPoint& best = res.points[*res.chosen];
  HeadProfile prof = head_profile(best.setting);
  prof.params["calibration_guard"] = a.guard.to_json();
  const fs::path profile_path = out / "head_profile.json";
  prof.save(profile_path.string());
  ReuseSettings s = settings_for(best.setting, "head_profile.json");  // beside the settings
  s.calibration = calib;
  save_reuse_settings(settings_path.string(), s);
  if (a.json) std::cout << calib.dump() << "\n";
  std::printf(
      "\nkept %s: EM %.1f (full %.1f), top-1 %.3f, %.1f%% prefill FLOPs saved\nwrote %s, %s, "
      "plot %s; %.0f s\n",
      best.setting.label().c_str(), 100 * best.measure.em, 100 * full.em, best.measure.top1,
      100 * best.measure.flops_saved, profile_path.c_str(), settings_path.c_str(), plot.c_str(),
      secs());
  return 0;
}

}  // namespace

void add_calibrate_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<CalibrateArgs>();
  CLI::App* c = app.add_subcommand(
      "calibrate",
      "Search the reuse settings on calibration samples; keep the fastest meeting the guard");
  c->add_option("--model", a->model, "HF model directory or GGUF file")->required();
  c->add_option("--calib", a->calib,
                "calibration RAG samples (JSONL[.gz] as eval reads), not the eval set; several "
                "files (prompt lengths, task mixes) are measured together")
      ->required();
  c->add_option("--n", a->n, "first N samples of each file (0: all)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  c->add_option("--target-top1", a->guard.target_top1,
                "guard: first-token agreement with full prefill at least this")
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--max-em-drop", a->guard.max_em_drop,
                "guard: EM points below full prefill's at most this (negative: must gain)")
      ->check(CLI::Range(-100.0, 100.0));
  c->add_option("--out", a->out,
                "directory for head_profile.json + reuse_settings.json "
                "(default: the model directory)");
  c->add_option("--plot", a->plot, "accuracy vs FLOPs saved PNG (default: OUT/calibration.png)");
  c->add_option("--grid", a->grid, "search space: quick | default | wide (docs/calibrate.md)")
      ->check(CLI::IsMember({"quick", "default", "wide"}));
  c->add_option("--ratios", a->ratios, "global head ratios tried (replaces the grid's)")
      ->delimiter(',');
  c->add_option("--windows", a->windows, "local windows tried")->delimiter(',');
  c->add_option("--sinks", a->sinks, "local sinks tried")->delimiter(',');
  c->add_option("--masses", a->masses, "Sparse FFN masses walked per layer, each in (0, 1)")
      ->delimiter(',');
  c->add_option("--dilates", a->dilates, "Sparse FFN dilations (first: the walk's)")
      ->delimiter(',');
  c->add_option("--max-evals", a->max_evals, "settings measured at most (0: the grid's)")
      ->check(CLI::Range(0, 1 << 16));
  c->add_option("--profile-max-tokens", a->profile_max_tokens, "profiler: longest run")
      ->check(CLI::Range(17, 1 << 20));
  c->add_option("--profile-chunks", a->profile_chunks, "profiler: chunks profiled (0: all)")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option("--profile-prefixes", a->profile_prefixes, "profiler: prefixes per chunk")
      ->check(CLI::Range(1, 64));
  c->add_option("--rank-window", a->rank_window,
                "window the heads are ranked at for every cut (0: the grid's smallest; -1: each "
                "window ranks its own, as before)")
      ->check(CLI::Range(-1, 1 << 30));
  c->add_option_function<int32_t>(
       "--reuse-chunk", [a](const int32_t& v) { a->reuse_chunk = v; },
       "rows per reuse forward, measured and written (default: the model's setting)")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option("--max-answer-tokens", a->max_answer_tokens)->check(CLI::Range(1, 1024));
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  c->add_flag("--json", a->json, "also print the calibration record (JSON) on stdout");
  c->add_flag("--quiet", a->quiet, "no progress on stderr");
  c->callback([a, &action] { action = [a] { return run_calibrate(*a); }; });
}

}  // namespace redknot::cli
