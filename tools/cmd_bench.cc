// `redknot bench`: engine throughput against the machine's measured ceilings.
#include <CLI/CLI.hpp>

#include "commands.h"
#include "engine_bench.h"

namespace redknot::cli {

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
  c->callback([a, &action] { action = [a] { return bench::run_engine_bench(*a); }; });
}

}  // namespace redknot::cli
