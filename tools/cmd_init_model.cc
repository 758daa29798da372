// `redknot init-model`: writes a loadable HF-style model directory at a real model's shape (its
// public config.json, sharded safetensors of seeded random weights, a real tokenizer), so that
// generate / serve / bench run at 8B-70B shapes with nothing downloaded.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "commands.h"
#include "core/error.h"
#include "loader/hf_config.h"
#include "loader/init_model.h"
#include "loader/model_shapes.h"

namespace redknot::cli {

namespace {
struct InitModelArgs {
  std::string config, tokenizer, out, dtype = "bf16";
  uint64_t seed = 0, max_shard_bytes = 5000000000ull;
  int64_t layers = 0;
  int threads = 0;
  bool force = false, quiet = false, list = false;
};

int run_list() {
  std::printf("%-13s %7s %9s %-10s %s\n", "config", "layers", "params", "tokenizer", "config of");
  for (const ModelShape& m : model_shapes()) {
    const ModelConfig c = parse_hf_config(model_shape_config(m.name), m.name);
    std::printf("%-13s %7lld %8.3fB %-10s %s\n", m.name, static_cast<long long>(c.num_layers),
                count_parameters(c) / 1e9, *m.tokenizer ? m.tokenizer : "-", m.hf_id);
  }
  return 0;
}

int run_init_model(const InitModelArgs& a) {
  const ModelShape& shape = model_shape(a.config);
  InitModelOptions o;
  o.dtype = a.dtype == "f32" ? DType::F32 : DType::BF16;
  o.config = model_shape_config(a.config, a.layers, a.dtype == "f32" ? "float32" : "bfloat16");
  o.out_dir = a.out;
  o.tokenizer_dir = a.tokenizer;
  o.seed = a.seed;
  o.max_shard_bytes = a.max_shard_bytes;
  o.threads = a.threads;
  o.force = a.force;
  o.provenance = {{"config", shape.name}, {"config_from", shape.hf_id}};
  if (a.layers > 0) o.provenance["layers_override"] = a.layers;
  const auto t0 = std::chrono::steady_clock::now();
  auto secs = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  double last = -1;
  if (!a.quiet)
    o.progress = [&](const InitModelProgress& p) {
      const double s = secs();
      if (s - last < 2.0 && p.tensors_done != p.tensors_total) return;
      last = s;
      std::fprintf(stderr, "init-model: shard %d/%d, %lld/%lld tensors, %.2f/%.2f GB, %.1f s\n",
                   p.shard, p.num_shards, static_cast<long long>(p.tensors_done),
                   static_cast<long long>(p.tensors_total), p.bytes_done / 1e9, p.bytes_total / 1e9,
                   s);
    };
  InitModelResult r = init_model_dir(o);
  std::printf(
      "%s (%s%s): %.3fB parameters, %.2f GB %s in %zu shard(s), seed %llu; %.1f s\nwrote %s\n",
      shape.name, shape.hf_id,
      a.layers > 0 ? (", " + std::to_string(a.layers) + " layers").c_str() : "", r.parameters / 1e9,
      r.bytes / 1e9, a.dtype.c_str(), r.shards.size(), static_cast<unsigned long long>(a.seed),
      secs(), a.out.c_str());
  return 0;
}
}  // namespace

void add_init_model_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<InitModelArgs>();
  CLI::App* c = app.add_subcommand(
      "init-model", "Write a HF model directory at a real model's shape with random weights");
  c->add_option("--config", a->config,
                "model shape: " + model_shape_names() + " (tests: test-llama3, test-qwen3)");
  c->add_option("--tokenizer", a->tokenizer,
                "directory holding tokenizer.json (+ tokenizer_config.json), copied into --out");
  c->add_option("--out", a->out, "model directory to write");
  c->add_option("--seed", a->seed, "weight seed");
  c->add_option("--dtype", a->dtype, "bf16 | f32")->check(CLI::IsMember({"bf16", "f32"}));
  c->add_option("--layers", a->layers, "override num_hidden_layers (tests)")
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  c->add_option("--max-shard-bytes", a->max_shard_bytes, "largest shard (default 5e9, as HF)")
      ->check(CLI::Range(uint64_t{1}, ~uint64_t{0}));
  c->add_option("--threads", a->threads, "generator threads (0: all)");
  c->add_flag("--force", a->force, "overwrite a model already in --out");
  c->add_flag("--quiet", a->quiet, "no progress lines");
  c->add_flag("--list", a->list, "list the known configs and exit");
  c->callback([a, &action] {
    if (a->list) {
      action = [] { return run_list(); };
      return;
    }
    if (a->config.empty() || a->out.empty() || a->tokenizer.empty())
      throw CLI::ValidationError("--config, --tokenizer and --out are required");
    action = [a] { return run_init_model(*a); };
  });
}

}  // namespace redknot::cli
