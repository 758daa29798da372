// `redknot eval`: accuracy, agreement with full prefill, TTFT and FLOPs of a prefill mode on a
// RAG dataset (JSONL or .jsonl.gz).
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "eval/rag_eval.h"
#include "reuse/chunk_store.h"
#include "reuse/hasher.h"
#include "reuse/reuse_prefill.h"

namespace redknot::cli {

namespace {
struct EvalArgs {
  int32_t tensor_parallel_size = 1;  // refused above 1 (refuse_tensor_parallel)
  std::string model, data, mode = "full", backend = "cpu", reference, predictions, quantization,
                           kv_cache_dtype = "auto";
  int64_t n = 0, chunk_store_bytes = 0;
  double time_limit_s = 0;  // > 0: no sample starts after this many seconds (reports truncated)
  int32_t page_size = kDefaultPageSize, max_answer_tokens = 16;
  ReuseOptions reuse;      // the baselines' parameters (cacheblend ratio, epic k)
  ReuseSettings settings;  // flags given; the model directory's reuse_settings.json fills the rest
  bool json = false, quiet = false;
};

std::vector<std::string> parse_modes(const std::string& spec) {
  if (spec == "all") return {"full", "prefix", "naive", "cacheblend", "epic", "redknot"};
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = spec.find(',', start);
    const std::string m = spec.substr(start, comma == std::string::npos ? comma : comma - start);
    if (!m.empty()) {
      parse_reuse_mode(m);  // validates: a clear error names the bad mode
      out.push_back(m);
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (out.empty()) throw Error("--mode: no mode given");
  return out;
}

// "n", or "n of N (time limit)" when --time-limit stopped the mode early.
std::string sample_count(const EvalReport& r) {
  return std::to_string(r.n) +
         (r.truncated() ? " of " + std::to_string(r.n_requested) + " (time limit)" : "");
}

void print_report(const EvalReport& r) {
  std::printf("| task | n | EM | F1 | top-1 | logits cos |\n|---|---|---|---|---|---|\n");
  for (const auto& [name, t] : r.per_task)
    std::printf("| %s | %lld | %.1f | %.1f | %.3f | %.4f |\n", name.c_str(), (long long)t.n,
                100 * t.em, 100 * t.f1, t.top1_match, t.logits_cos);
  std::printf("| all | %s | %.1f | %.1f | %.3f | %.4f |\n", sample_count(r).c_str(), 100 * r.em,
              100 * r.f1, r.top1_match, r.logits_cos);
  std::printf("\nreused %lld of %lld prompt tokens from the chunk store\n",
              (long long)r.reused_tokens, (long long)r.prompt_tokens);
  std::printf("mode %s: TTFT p50 %.1f ms, p90 %.1f ms; FLOPs %.3g vs full %.3g (%.1f%% saved)\n",
              r.mode.c_str(), r.ttft_ms_p50, r.ttft_ms_p90, r.flops, r.flops_full,
              r.flops_full > 0 ? 100.0 * (1 - r.flops / r.flops_full) : 0.0);
}

// One row per mode, then EM per task family per mode: the comparison table of docs/benchmarks.md.
void print_comparison(const std::vector<EvalReport>& reports) {
  const double full_ttft = reports.front().mode == "full" ? reports.front().ttft_ms_p50 : 0;
  auto speedup = [&](const EvalReport& r) {
    char buf[32] = "-";
    if (full_ttft > 0 && r.ttft_ms_p50 > 0)
      std::snprintf(buf, sizeof buf, "%.2fx", full_ttft / r.ttft_ms_p50);
    return std::string(buf);
  };
  std::printf(
      "| mode | n | EM | F1 | top-1 | logits cos | TTFT p50 ms | TTFT vs full | FLOPs saved |\n"
      "|---|---|---|---|---|---|---|---|---|\n");
  for (const EvalReport& r : reports)
    std::printf("| %s | %s | %.1f | %.1f | %.3f | %.4f | %.1f | %s | %.1f%% |\n", r.mode.c_str(),
                sample_count(r).c_str(), 100 * r.em, 100 * r.f1, r.top1_match, r.logits_cos,
                r.ttft_ms_p50, speedup(r).c_str(),
                r.flops_full > 0 ? 100.0 * (1 - r.flops / r.flops_full) : 0.0);
  std::printf("\n| EM by task | ");
  for (const EvalReport& r : reports) std::printf("%s | ", r.mode.c_str());
  std::printf("\n|---|");
  for (size_t i = 0; i < reports.size(); ++i) std::printf("---|");
  std::printf("\n");
  for (const auto& [name, t0] : reports.front().per_task) {
    std::printf("| %s (n=%lld) | ", name.c_str(), (long long)t0.n);
    for (const EvalReport& r : reports) {
      auto it = r.per_task.find(name);
      std::printf("%.1f | ", it == r.per_task.end() ? 0.0 : 100 * it->second.em);
    }
    std::printf("\n");
  }
}

// The full-prefill reference logits, kept in a file so that sweeps over one mode's parameters
// do not recompute them. One record per sample, keyed by (model fingerprint, sample hash), so any
// subset of the samples (one task family, a slice) reads the rows it has and adds the ones it
// lacks: "RKREF2\n", then records of fp, sample hash, vocab (u64 each) and vocab floats. Two files
// merge by appending the second's records (everything after its 7-byte magic) to the first.
// Files of the old whole-run format ("RKREF1\n": fp, hash of all samples, n, vocab, n rows) are
// read when they match the run exactly and rewritten as RKREF2.
void hash_sample(Hasher& h, const RagSample& r) {
  h.pod(static_cast<uint64_t>(r.segments.size()));
  for (const auto& seg : r.segments) h.str(seg);
  h.str(r.question);
}

uint64_t sample_hash(const RagSample& r) {  // RKREF2's per-sample key
  Hasher h;
  hash_sample(h, r);
  return h.digest();
}

uint64_t samples_hash(const std::vector<RagSample>& samples) {  // RKREF1's whole-run key
  Hasher h;
  for (const RagSample& r : samples) hash_sample(h, r);
  return h.digest();
}

constexpr char kRefMagicV1[8] = {'R', 'K', 'R', 'E', 'F', '1', '\n', 0};
constexpr char kRefMagicV2[8] = {'R', 'K', 'R', 'E', 'F', '2', '\n', 0};

struct ReferenceFile {
  std::map<std::pair<uint64_t, uint64_t>, std::vector<float>> rows;  // (fp, sample hash) -> [V]
  bool changed = false;  // rows added, or read from the old format
};

// Reads what `path` holds (nothing if it is absent); a truncated or foreign file is an error, so
// a damaged reference never silently turns into recomputed rows that overwrite it.
ReferenceFile read_reference(const std::string& path, uint64_t fp, uint64_t V,
                             const std::vector<RagSample>& samples,
                             const std::vector<uint64_t>& keys) {
  ReferenceFile ref;
  std::ifstream f(path, std::ios::binary);
  if (!f) return ref;
  char magic[8] = {};
  f.read(magic, 7);
  if (f && std::memcmp(magic, kRefMagicV1, 7) == 0) {
    uint64_t hdr[4] = {};
    f.read(reinterpret_cast<char*>(hdr), sizeof(hdr));
    if (!f || hdr[0] != fp || hdr[1] != samples_hash(samples) || hdr[2] != samples.size() ||
        hdr[3] != V)
      return ref;  // another run's whole-run file: replaced by this run's records
    for (uint64_t key : keys) {
      std::vector<float> row(V);
      f.read(reinterpret_cast<char*>(row.data()), V * sizeof(float));
      if (!f) throw Error(path + ": truncated reference logits");
      ref.rows[{fp, key}] = std::move(row);
    }
    ref.changed = true;
    return ref;
  }
  if (!f || std::memcmp(magic, kRefMagicV2, 7) != 0)
    throw Error(path + ": not a reference logits file (RKREF1 or RKREF2)");
  for (;;) {
    uint64_t hdr[3] = {};
    f.read(reinterpret_cast<char*>(hdr), sizeof(hdr));
    if (f.gcount() == 0 && f.eof()) break;
    if (!f || hdr[2] == 0 || hdr[2] > (uint64_t{1} << 24))
      throw Error(path + ": damaged reference logits record");
    std::vector<float> row(hdr[2]);
    f.read(reinterpret_cast<char*>(row.data()), hdr[2] * sizeof(float));
    if (!f) throw Error(path + ": truncated reference logits");
    ref.rows[{hdr[0], hdr[1]}] = std::move(row);
  }
  return ref;
}

// Writes `path` through a temporary file renamed into place, so a crash never leaves half a file.
void write_replacing(const std::string& path, const std::string& what,
                     const std::function<void(std::ofstream&)>& write) {
  const std::string tmp = path + ".tmp";
  std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
  write(f);
  f.close();
  if (!f || std::rename(tmp.c_str(), path.c_str()) != 0)
    throw Error(path + ": cannot write the " + what);
}

void save_reference(const std::string& path, const ReferenceFile& ref) {
  write_replacing(path, "reference logits", [&](std::ofstream& f) {
    f.write(kRefMagicV2, 7);
    for (const auto& [key, row] : ref.rows) {
      const uint64_t hdr[3] = {key.first, key.second, row.size()};
      f.write(reinterpret_cast<const char*>(hdr), sizeof(hdr));
      f.write(reinterpret_cast<const char*>(row.data()), row.size() * sizeof(float));
    }
  });
}

// One JSON line per (mode, sample): what each mode answered, for per-sample comparisons.
void save_predictions(const std::string& path, const std::vector<EvalReport>& reports) {
  write_replacing(path, "predictions", [&](std::ofstream& f) {
    for (const EvalReport& r : reports)
      for (const SampleResult& s : r.samples) {
        nlohmann::json j = s.to_json();
        j["mode"] = r.mode;
        f << j.dump() << "\n";
      }
  });
}

int run_eval(const EvalArgs& a) {
  refuse_tensor_parallel("eval", a.tensor_parallel_size);
  const std::vector<std::string> modes = parse_modes(a.mode);
  const ReuseSettings settings = resolve_reuse_settings(a.model, a.settings);
  for (const std::string& mode : modes)
    if (const std::string why = settings.refusal(parse_reuse_mode(mode)); !why.empty())
      throw Error(why + "; calibrate again (redknot calibrate) or leave redknot out of --mode");
  EngineOptions eo;
  eo.backend = a.backend;
  eo.quantization = a.quantization;
  LoadedModel m = load_model(a.model, eo);
  if (!m.tokenizer) throw Error(a.model + ": no tokenizer found (eval builds prompts from text)");
  std::vector<RagSample> samples = load_rag_dataset(a.data, a.n);
  // The reference, computed once for all modes; rows the reference file has are read from it.
  std::vector<std::vector<float>> full_logits(samples.size());
  const uint64_t fp = model_fingerprint(m.model->config(), m.ckpt);
  const uint64_t V = static_cast<uint64_t>(m.model->config().vocab_size);
  ReferenceFile ref;
  std::vector<uint64_t> keys;  // per-sample reference keys
  for (const RagSample& s : samples) keys.push_back(sample_hash(s));
  if (!a.reference.empty()) {
    ref = read_reference(a.reference, fp, V, samples, keys);
    int64_t found = 0;
    for (size_t i = 0; i < samples.size(); ++i) {
      auto it = ref.rows.find({fp, keys[i]});
      if (it == ref.rows.end() || it->second.size() != V) continue;
      full_logits[i] = it->second;
      ++found;
    }
    if (!a.quiet)
      std::fprintf(stderr, "reference logits: %lld of %zu samples read from %s\n", (long long)found,
                   samples.size(), a.reference.c_str());
  }
  std::optional<std::chrono::steady_clock::time_point> deadline;
  if (a.time_limit_s > 0)
    deadline = std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                   std::chrono::duration<double>(a.time_limit_s));
  std::vector<EvalReport> reports;
  for (const std::string& mode : modes) {
    EvalOptions opts;
    opts.deadline = deadline;
    opts.reuse = a.reuse;
    opts.reuse.mode = parse_reuse_mode(mode);
    settings.apply(opts.reuse);
    opts.chunk_store_bytes = a.chunk_store_bytes;
    opts.max_answer_tokens = a.max_answer_tokens;
    opts.kv.page_size = a.page_size;
    opts.kv.kv_cache_dtype = a.kv_cache_dtype;
    opts.kv.head_profile_path = settings.head_profile.value_or("");
    opts.full_logits = &full_logits;
    reports.push_back(run_rag_eval(*m.model, m.ckpt, *m.tokenizer, samples, opts,
                                   [&](int64_t done, int64_t total) {
                                     if (!a.quiet)
                                       std::fprintf(stderr, "\r[eval %s] %lld/%lld", mode.c_str(),
                                                    (long long)done, (long long)total);
                                   }));
    if (!a.quiet) std::fprintf(stderr, "\n");
    if (reports.back().truncated())
      std::fprintf(stderr, "eval %s: --time-limit reached after %lld of %lld samples\n",
                   mode.c_str(), (long long)reports.back().n,
                   (long long)reports.back().n_requested);
    if (reuse_mode_uses_head_profile(opts.reuse.mode) && reports.back().global_head_fraction >= 1)
      std::fprintf(stderr,
                   "eval %s: no head profile (the model directory's head_profile.json or "
                   "--head-profile): every head stayed global\n",
                   mode.c_str());
  }
  if (!a.reference.empty()) {
    for (size_t i = 0; i < samples.size() && i < full_logits.size(); ++i) {
      if (full_logits[i].empty()) continue;
      std::vector<float>& slot = ref.rows[{fp, keys[i]}];
      if (slot.empty()) slot = full_logits[i], ref.changed = true;
    }
    if (ref.changed) save_reference(a.reference, ref);
  }
  if (!a.predictions.empty()) save_predictions(a.predictions, reports);
  if (a.json) {
    if (reports.size() == 1) {
      std::cout << reports.front().to_json().dump() << "\n";
    } else {
      nlohmann::json arr = nlohmann::json::array();
      for (const EvalReport& r : reports) arr.push_back(r.to_json());
      std::cout << arr.dump() << "\n";
    }
    return 0;
  }
  if (reports.size() == 1)
    print_report(reports.front());
  else
    print_comparison(reports);
  return 0;
}
}  // namespace

void add_eval_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* c = app.add_subcommand("eval", "Evaluate a prefill mode on a RAG dataset");
  c->add_option("--model", a->model, "HF model directory or GGUF file")->required();
  c->add_option("--data", a->data, "JSONL dataset (.jsonl or .jsonl.gz)")->required();
  c->add_option("--n", a->n, "first N samples (0: all)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  c->add_option("--mode", a->mode,
                "full | prefix | naive | cacheblend | epic | redknot, a comma list of them, or all "
                "(modes share the full-prefill reference; --json then prints an array)");
  c->add_option("--cacheblend-ratio", a->reuse.cacheblend_ratio)->check(CLI::Range(0.0, 1.0));
  c->add_option("--epic-k", a->reuse.epic_k)->check(CLI::Range(0, 1 << 20));
  add_reuse_settings_options(c, &a->settings);
  ReuseSettings* s = &a->settings;
  c->add_flag_callback(
      "--no-skip-dead-rows", [s] { s->skip_dead_rows = false; },
      "redknot mode as the paper: every recomputed row through every layer");
  c->add_flag_callback(
      "--query-full-attention", [s] { s->query_full_attention = true; },
      "redknot mode: the query's rows attend with every head global (beyond the paper)");
  c->add_option("--chunk-store-bytes", a->chunk_store_bytes, "pool bytes for cached segments");
  c->add_option("--reference", a->reference,
                "file caching full prefill's logits per (model, sample): rows it has are read, "
                "missing ones computed and added");
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  add_precision_options(c, &a->quantization, &a->kv_cache_dtype);
  add_tensor_parallel_option(c, &a->tensor_parallel_size);
  c->add_option("--page-size", a->page_size)->check(CLI::Range(1, 4096));
  c->add_option("--max-answer-tokens", a->max_answer_tokens)->check(CLI::Range(1, 1024));
  c->add_option("--time-limit", a->time_limit_s,
                "seconds: no sample starts after them; each mode reports the samples it finished "
                "(n of N, \"truncated\" in --json)")
      ->check(CLI::Range(0.0, 1e9));
  c->add_option(
      "--predictions", a->predictions,
      "write one JSON line per mode and sample (id, task, prediction, em, top1_match, ...)");
  c->add_flag("--json", a->json, "print one JSON object (an array for several modes)");
  c->add_flag("--quiet", a->quiet, "no progress on stderr");
  c->callback([a, &action] { action = [a] { return run_eval(*a); }; });
}

}  // namespace redknot::cli
