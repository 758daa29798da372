// `redknot generate`: run a prompt and print (or stream) the continuation.
#include <CLI/CLI.hpp>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "engine/flops.h"
#include "engine/generate.h"
#include "engine/kv_setup.h"
#include "loader/safetensors.h"
#include "reuse/chunk_prefill.h"
#include "reuse/chunk_store.h"
#include "reuse/reuse_prefill.h"

namespace redknot::cli {

namespace {
struct GenerateArgs {
  std::string model, prompt, prompt_ids, logits_out, backend = "cpu", head_profile;
  std::vector<std::string> segments;  // reuse units before the prompt (documents, system)
  std::string mode = "full", chunk_store_dir;
  int64_t chunk_store_bytes = int64_t{256} << 20;
  int32_t page_size = 64;
  int64_t kv_budget = 0;
  int32_t max_tokens = 32, prefill_chunk = 0;  // 0: default_prefill_chunk(backend)
  int32_t reuse_chunk = ReuseOptions{}.chunk;
  float temperature = 0.0f, top_p = 1.0f;
  int32_t top_k = 0;
  uint64_t seed = 0;
  bool json = false, ignore_eos = false;
  bool skip_dead_rows = true;         // redknot mode: dead-row skipping past the last global layer
  bool query_full_attention = false;  // redknot mode: the query's rows attend with every head
};

// The prompt as reuse units: each --segment tokenized alone (BOS, if the tokenizer adds one, in
// front of the first), then --prompt as the query.
SegmentedPrompt segmented_prompt(const GenerateArgs& a, const Tokenizer& tok) {
  SegmentedPrompt p;
  for (size_t i = 0; i < a.segments.size(); ++i)
    p.segments.push_back(tok.encode(a.segments[i], i == 0));
  p.query = tok.encode(a.prompt, a.segments.empty());
  return p;
}

// Prompt given as segments (or a reuse mode asked for): prefill through the chunk store in the
// chosen mode, then decode as usual. The disk tier (--chunk-store-dir) keeps segments across runs.
int run_segmented(const GenerateArgs& a, LoadedModel& m) {
  if (!m.tokenizer) throw Error(a.model + ": no tokenizer found; segments are text");
  ReuseOptions ro;
  ro.mode = parse_reuse_mode(a.mode);
  ro.skip_dead_rows = a.skip_dead_rows;
  ro.query_full_attention = a.query_full_attention;
  ro.chunk = a.reuse_chunk;
  const SegmentedPrompt p = segmented_prompt(a, *m.tokenizer);
  const ModelConfig& cfg = m.model->config();
  KvOptions kvo;
  kvo.page_size = a.page_size;
  kvo.head_profile_path = reuse_mode_uses_head_profile(ro.mode) ? a.head_profile : "";
  const int64_t tokens = p.total_tokens() + a.max_tokens + 1;
  const int64_t request_bytes = kv_bytes_for(*m.model, kvo.page_size, tokens);
  kvo.budget_bytes = a.kv_budget > 0 ? a.kv_budget : 2 * request_bytes + a.chunk_store_bytes;
  KvStore store = make_kv_store(*m.model, kvo);
  ChunkStoreOptions cso;
  cso.pool_budget_bytes = a.chunk_store_bytes;
  cso.model_fp = model_fingerprint(cfg, m.ckpt);
  if (!a.chunk_store_dir.empty()) {
    cso.disk_dir = a.chunk_store_dir;
    cso.disk_budget_bytes = int64_t{4} << 30;
  }
  ChunkStore chunks(*m.model, *store.pool, cso);
  PrefillOutcome pre = prefill_with_reuse(*m.model, *store.cache, 0, p, &chunks, ro);
  GenerateOptions opts;
  opts.max_tokens = a.max_tokens;
  opts.sampling = {a.temperature, a.top_p, a.top_k, a.seed};
  opts.stop_at_eos = !a.ignore_eos;
  StreamDecoder stream(*m.tokenizer);
  GenerateResult r = decode_from(*m.model, *store.cache, 0, pre.last_logits, opts, [&](int32_t id) {
    if (!a.json) std::cout << stream.push(id) << std::flush;
    return true;
  });
  const ChunkStoreStats cs = chunks.stats();
  if (a.json) {
    nlohmann::json j;
    j["ids"] = r.ids;
    j["text"] = m.tokenizer->decode(r.ids);
    j["mode"] = a.mode;
    j["prompt_tokens"] = p.total_tokens();
    j["reused_tokens"] = pre.reused_tokens;
    j["ttft_ms"] = pre.ms;
    j["decode_ms"] = r.decode_ms;
    j["flops"] = pre.flops.to_json();
    j["flops_full"] =
        prefill_flops(cfg, HeadProfile::native(cfg), 0, p.total_tokens(), 1).to_json();
    j["chunk_store"] = {{"pool_hits", cs.pool_hits},
                        {"host_hits", cs.host_hits},
                        {"disk_hits", cs.disk_hits},
                        {"misses", cs.misses}};
    std::cout << j.dump() << "\n";
  } else {
    std::cout << stream.finish() << "\n";
    std::cerr << "[" << a.mode << ": prompt " << p.total_tokens() << " tokens ("
              << pre.reused_tokens << " reused), TTFT " << pre.ms << " ms, "
              << pre.flops.total() / 1e9 << " GFLOP; chunk store hits "
              << cs.pool_hits + cs.host_hits + cs.disk_hits << ", misses " << cs.misses << "]\n";
  }
  return 0;
}

int run_generate(const GenerateArgs& a) {
  LoadedModel m = load_model(a.model, a.backend);
  if (!a.segments.empty() || a.mode != "full") {
    if (!a.prompt_ids.empty()) throw Error("--segment/--mode take --prompt text, not --prompt-ids");
    if (!a.logits_out.empty()) throw Error("--logits-out works with plain prompts only");
    return run_segmented(a, m);
  }
  std::vector<int32_t> prompt;
  if (!a.prompt_ids.empty()) {
    prompt = parse_id_list(a.prompt_ids);  // used as given: no BOS added
  } else {
    if (!m.tokenizer) throw Error(a.model + ": no tokenizer found; use --prompt-ids");
    prompt = m.tokenizer->encode(a.prompt, /*add_special=*/true);
  }
  KvOptions kvo;
  kvo.page_size = a.page_size;
  kvo.budget_bytes = a.kv_budget;
  kvo.tokens = static_cast<int64_t>(prompt.size()) + a.max_tokens + 1;
  kvo.head_profile_path = a.head_profile;
  KvStore store = make_kv_store(*m.model, kvo);
  KvCache& kv = *store.cache;
  GenerateOptions opts;
  opts.max_tokens = a.max_tokens;
  opts.sampling = {a.temperature, a.top_p, a.top_k, a.seed};
  opts.prefill_chunk = a.prefill_chunk > 0 ? a.prefill_chunk : default_prefill_chunk(a.backend);
  opts.stop_at_eos = !a.ignore_eos;
  opts.keep_prompt_logits = !a.logits_out.empty();

  std::unique_ptr<StreamDecoder> stream;
  if (!a.json && m.tokenizer) stream = std::make_unique<StreamDecoder>(*m.tokenizer);
  GenerateResult r = generate(*m.model, kv, 0, prompt, opts, [&](int32_t id) {
    if (stream) {
      std::cout << stream->push(id) << std::flush;
    } else if (!a.json) {
      std::cout << id << " " << std::flush;
    }
    return true;
  });
  if (stream) std::cout << stream->finish();
  if (!a.json) std::cout << "\n";

  if (!a.logits_out.empty()) write_safetensors(a.logits_out, {{"logits", r.prompt_logits}});
  if (a.json) {
    nlohmann::json j;
    j["ids"] = r.ids;
    j["text"] = m.tokenizer ? nlohmann::json(m.tokenizer->decode(r.ids)) : nlohmann::json();
    j["prompt_tokens"] = prompt.size();
    j["flops"] =
        prefill_flops(m.model->config(), store.profile, 0, static_cast<int64_t>(prompt.size()), 1)
            .to_json();
    j["prefill_ms"] = r.prefill_ms;
    j["decode_ms"] = r.decode_ms;
    std::cout << j.dump() << "\n";
  } else {
    std::cerr << "[prompt " << prompt.size() << " tokens, prefill " << r.prefill_ms << " ms; "
              << r.ids.size() << " tokens in " << r.decode_ms << " ms]\n";
  }
  return 0;
}
}  // namespace

void add_generate_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* c = app.add_subcommand("generate", "Generate a continuation of a prompt");
  c->add_option("--model", a->model, "HF model directory or GGUF file")->required();
  auto* p = c->add_option("--prompt", a->prompt, "prompt text (BOS added as the tokenizer says)");
  auto* pi =
      c->add_option("--prompt-ids", a->prompt_ids, "comma-separated token ids (no BOS added)");
  p->excludes(pi);
  c->add_option("--max-tokens", a->max_tokens, "tokens to generate")->check(CLI::Range(0, 1 << 20));
  c->add_option("--temperature", a->temperature, "0 = greedy");
  c->add_option("--top-p", a->top_p);
  c->add_option("--top-k", a->top_k);
  c->add_option("--seed", a->seed);
  c->add_option("--prefill-chunk", a->prefill_chunk,
                "prompt tokens per forward pass (0: 512 on the CPU, 4096 on CUDA)")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  c->add_option("--segment", a->segments,
                "a reuse unit (document, system prompt) before --prompt; repeatable");
  c->add_option("--mode", a->mode, "full | prefix | naive | cacheblend | epic | redknot");
  c->add_option("--chunk-store-dir", a->chunk_store_dir, "disk tier of the chunk store");
  c->add_option("--reuse-chunk", a->reuse_chunk,
                "rows per forward of every reuse pass (0: each pass whole); as serve and eval")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option("--skip-dead-rows", a->skip_dead_rows,
                "redknot mode skips rows no later token reads past the last global layer (exact)");
  c->add_option("--query-full-attention", a->query_full_attention,
                "redknot mode: the query's rows attend with every head global, local heads over "
                "the whole prompt (beyond the paper; true | false)");
  c->add_option("--chunk-store-bytes", a->chunk_store_bytes, "pool bytes for cached segments");
  c->add_option("--head-profile", a->head_profile,
                "head profile JSON (default: the model's own attention)");
  c->add_option("--page-size", a->page_size, "KV page size in tokens")->check(CLI::Range(1, 4096));
  c->add_option("--kv-budget", a->kv_budget, "KV pool size in bytes (default: fits the request)");
  c->add_flag("--json", a->json, "print {\"ids\": [...], \"text\": ...}");
  c->add_flag("--ignore-eos", a->ignore_eos, "keep generating past EOS");
  c->add_option("--logits-out", a->logits_out, "write prompt logits [len, vocab] as safetensors");
  c->callback([a, c, &action] {
    if (a->prompt.empty() && a->prompt_ids.empty())
      throw CLI::ValidationError("--prompt or --prompt-ids is required");
    action = [a] { return run_generate(*a); };
  });
}

}  // namespace redknot::cli
