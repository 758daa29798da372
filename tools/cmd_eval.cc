// `redknot eval`: accuracy, agreement with full prefill, TTFT and FLOPs of a prefill mode on a
// RAG dataset (JSONL or .jsonl.gz).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "eval/rag_eval.h"

namespace redknot::cli {

namespace {
struct EvalArgs {
  std::string model, data, mode = "full", head_profile, backend = "cpu";
  int64_t n = 0, chunk_store_bytes = 0;
  int32_t page_size = 64, max_answer_tokens = 16;
  ReuseOptions reuse;
  bool json = false, quiet = false, no_sparse_ffn = false;
};

int run_eval(const EvalArgs& a) {
  ReuseOptions reuse = a.reuse;
  reuse.mode = parse_reuse_mode(a.mode);
  reuse.sparse_ffn_enabled = !a.no_sparse_ffn;
  LoadedModel m = load_model(a.model, a.backend);
  if (!m.tokenizer) throw Error(a.model + ": no tokenizer found (eval builds prompts from text)");
  std::vector<RagSample> samples = load_rag_dataset(a.data, a.n);
  EvalOptions opts;
  opts.reuse = reuse;
  opts.chunk_store_bytes = a.chunk_store_bytes;
  opts.max_answer_tokens = a.max_answer_tokens;
  opts.kv.page_size = a.page_size;
  opts.kv.head_profile_path = a.head_profile;
  EvalReport r =
      run_rag_eval(*m.model, m.ckpt, *m.tokenizer, samples, opts, [&](int64_t done, int64_t total) {
        if (!a.quiet)
          std::fprintf(stderr, "\r[eval %s] %lld/%lld", a.mode.c_str(), (long long)done,
                       (long long)total);
      });
  if (!a.quiet) std::fprintf(stderr, "\n");
  if (a.json) {
    std::cout << r.to_json().dump() << "\n";
    return 0;
  }
  std::printf("| task | n | EM | F1 | top-1 | logits cos |\n|---|---|---|---|---|---|\n");
  for (const auto& [name, t] : r.per_task)
    std::printf("| %s | %lld | %.1f | %.1f | %.3f | %.4f |\n", name.c_str(), (long long)t.n,
                100 * t.em, 100 * t.f1, t.top1_match, t.logits_cos);
  std::printf("| all | %lld | %.1f | %.1f | %.3f | %.4f |\n", (long long)r.n, 100 * r.em,
              100 * r.f1, r.top1_match, r.logits_cos);
  std::printf("\nreused %lld of %lld prompt tokens from the chunk store\n",
              (long long)r.reused_tokens, (long long)r.prompt_tokens);
  std::printf("mode %s: TTFT p50 %.1f ms, p90 %.1f ms; FLOPs %.3g vs full %.3g (%.1f%% saved)\n",
              r.mode.c_str(), r.ttft_ms_p50, r.ttft_ms_p90, r.flops, r.flops_full,
              r.flops_full > 0 ? 100.0 * (1 - r.flops / r.flops_full) : 0.0);
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
  c->add_option("--mode", a->mode, "full | prefix | naive | cacheblend | epic | redknot");
  c->add_option("--cacheblend-ratio", a->reuse.cacheblend_ratio)->check(CLI::Range(0.0, 1.0));
  c->add_option("--epic-k", a->reuse.epic_k)->check(CLI::Range(0, 1 << 20));
  c->add_option("--dense-until", a->reuse.sparse_ffn.dense_until, "Sparse FFN: dense layers below");
  c->add_option("--mass", a->reuse.sparse_ffn.mass, "Sparse FFN: importance mass kept")
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--deep-start", a->reuse.sparse_ffn.deep_start, "Sparse FFN: first deep layer");
  c->add_option("--mass-deep", a->reuse.sparse_ffn.mass_deep)->check(CLI::Range(0.0, 1.0));
  c->add_option("--recent-n", a->reuse.sparse_ffn.recent_n)->check(CLI::Range(0, 1 << 20));
  c->add_flag("--no-sparse-ffn", a->no_sparse_ffn, "redknot mode without Sparse FFN");
  c->add_option("--chunk-store-bytes", a->chunk_store_bytes, "pool bytes for cached segments");
  c->add_option("--head-profile", a->head_profile, "head profile JSON");
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  c->add_option("--page-size", a->page_size)->check(CLI::Range(1, 4096));
  c->add_option("--max-answer-tokens", a->max_answer_tokens)->check(CLI::Range(1, 1024));
  c->add_flag("--json", a->json, "print one JSON object");
  c->add_flag("--quiet", a->quiet, "no progress on stderr");
  c->callback([a, &action] { action = [a] { return run_eval(*a); }; });
}

}  // namespace redknot::cli
