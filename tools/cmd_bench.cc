// `redknot bench`: engine throughput against the machine's measured ceilings (the default), and
// the SegPagedAttention benchmarks `bench capacity` and `bench attention`.
#include <CLI/CLI.hpp>

#include "commands.h"
#include "engine_bench.h"
#include "kv_bench.h"
#include "remote_bench.h"

namespace redknot::cli {
namespace {

void add_kv_shape_options(CLI::App* c, bench::KvShape& s) {
  c->add_option("--layers", s.layers, "layers (Llama-3-8B: 32)")->check(CLI::Range(1, 1024));
  c->add_option("--kv-heads", s.kv_heads, "kv heads per layer")->check(CLI::Range(1, 1024));
  c->add_option("--head-dim", s.head_dim)->check(CLI::Range(1, 1024));
  c->add_option("--page-size", s.page_size, "tokens per KV page")->check(CLI::Range(1, 4096));
  c->add_option("--global-fraction", s.global_fraction, "head-aware profile: global share")
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--window", s.window, "local heads: window W")->check(CLI::Range(1, 1 << 24));
  c->add_option("--sink", s.sink, "local heads: sink tokens s")->check(CLI::Range(0, 1 << 24));
}

}  // namespace

void add_bench_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<bench::EngineBenchArgs>();
  CLI::App* c = app.add_subcommand("bench", "Prefill/decode throughput on a random-weight model");
  c->add_option("--shape", a->shape, "1b | llama3-8b | mistral-7b | tiny");
  c->add_option("--layers", a->layers, "override the number of layers");
  c->add_option("--dtype", a->dtype, "weight dtype: bf16 | f32");
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  c->add_option("--prefill-tokens", a->prefill_tokens)->check(CLI::Range(1, 1 << 20));
  c->add_option("--decode-tokens", a->decode_tokens)->check(CLI::Range(0, 1 << 20));
  c->add_option("--repeats", a->repeats)->check(CLI::Range(1, 100));
  c->require_subcommand(0, 1);

  auto cap = std::make_shared<bench::CapacityBenchArgs>();
  CLI::App* cc = c->add_subcommand(
      "capacity", "Sessions that fit a KV budget: ideal formula vs a filled accounting pool");
  add_kv_shape_options(cc, cap->shape);
  cc->add_option("--budget-gib", cap->budget_gib, "KV budget (bf16 bytes)")
      ->check(CLI::Range(0.001, 1e6));
  cc->add_option("--tokens", cap->tokens, "tokens per session")->check(CLI::Range(1, 1 << 26));
  cc->add_option("--chunk", cap->chunk, "prefill chunk")->check(CLI::Range(1, 1 << 20));
  cc->callback([cap, &action] { action = [cap] { return bench::run_capacity_bench(*cap); }; });

  auto att = std::make_shared<bench::AttentionBenchArgs>();
  CLI::App* ca = c->add_subcommand(
      "attention", "CPU decode attention per token: dense+mask vs paged all-global/head-aware");
  add_kv_shape_options(ca, att->shape);
  ca->add_option("--q-heads", att->shape.q_heads)->check(CLI::Range(1, 4096));
  ca->add_option("--contexts", att->contexts, "context lengths")->delimiter(',');
  ca->add_option("--batch", att->batches, "sequences per decode step")->delimiter(',');
  ca->add_option("--chunk", att->chunk, "prefill chunk used to fill the cache")
      ->check(CLI::Range(1, 1 << 20));
  ca->add_option("--repeats", att->repeats)->check(CLI::Range(1, 1000));
  ca->add_option("--threads", att->threads, "CPU threads (0: all)");
  ca->callback([att, &action] { action = [att] { return bench::run_attention_bench(*att); }; });

  auto dp = std::make_shared<bench::DecodePlanBenchArgs>();
  CLI::App* cd = c->add_subcommand(
      "decode-plan",
      "Host time of a decode step's KV bookkeeping (slots + every layer's page-table plan)");
  add_kv_shape_options(cd, dp->shape);
  cd->add_option("--contexts", dp->contexts, "context lengths")->delimiter(',');
  cd->add_option("--batch", dp->batches, "sequences per decode step")->delimiter(',');
  cd->add_option("--steps", dp->steps, "decode steps timed per row")->check(CLI::Range(1, 100000));
  cd->callback([dp, &action] { action = [dp] { return bench::run_decode_plan_bench(*dp); }; });

  auto rem = std::make_shared<bench::RemoteBenchArgs>();
  CLI::App* cr = c->add_subcommand(
      "chunk-store-remote",
      "TTFT of a document as a local chunk-store hit, a Redis (remote) hit and recomputed, and "
      "the bytes the remote hit fetched head-major vs token-major");
  cr->add_option("--shape", rem->shape, "preset shape (random weights): rag-7m | tiny | 1b ...");
  cr->add_option("--layers", rem->layers, "override the preset's layers")
      ->check(CLI::Range(1, 1024));
  cr->add_option("--redis", rem->redis,
                 "redis://host:port or unix:///path.sock (default: a private redis-server)");
  cr->add_option("--tokens", rem->tokens, "document lengths")->delimiter(',');
  cr->add_option("--global-fraction", rem->global_fraction)->check(CLI::Range(0.0, 1.0));
  cr->add_option("--window", rem->window)->check(CLI::Range(1, 1 << 24));
  cr->add_option("--sink", rem->sink)->check(CLI::Range(0, 1 << 24));
  cr->add_option("--block-rows", rem->block_rows, "rows per shard block")
      ->check(CLI::Range(1, 1 << 20));
  cr->add_option("--repeats", rem->repeats)->check(CLI::Range(1, 100));
  cr->callback([rem, &action] { action = [rem] { return bench::run_remote_bench(*rem); }; });

  // Without a subcommand `bench` stays the engine benchmark.
  c->callback([a, c, &action] {
    if (c->get_subcommands().empty()) action = [a] { return bench::run_engine_bench(*a); };
  });
}

}  // namespace redknot::cli
