// `redknot generate`: run a prompt and print (or stream) the continuation.
#include <CLI/CLI.hpp>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "engine/engine_setup.h"
#include "engine/generate.h"
#include "loader/safetensors.h"
#include "model/flops.h"
#include "reuse/chunk_prefill.h"
#include "reuse/chunk_store.h"
#include "reuse/reuse_prefill.h"

namespace redknot::cli {

namespace {
struct GenerateArgs {
  std::string model, prompt, prompt_ids, logits_out, backend = "cpu", quantization,
                                                     kv_cache_dtype = "auto";
  std::vector<std::string> segments;  // reuse units before the prompt (documents, system)
  std::string mode = "full", chunk_store_dir;
  int64_t chunk_store_bytes = 0;  // 0: the engine's default share (engine_setup.h)
  int32_t page_size = kDefaultPageSize;
  int64_t kv_budget = 0;
  int32_t max_tokens = 32, prefill_chunk = 0;  // 0: default_prefill_chunk(backend)
  int32_t tensor_parallel_size = 1;
  float temperature = 0.0f, top_p = 1.0f;
  int32_t top_k = 0;
  uint64_t seed = 0;
  bool json = false, ignore_eos = false, print_config = false;
  ReuseSettings settings;  // flags given; the model directory's reuse_settings.json fills the rest
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
// Tensor-parallel: every rank runs this on its model and stores (its heads); rank 0 prints.
void run_segmented(const GenerateArgs& a, LoadedModel& m, Model& model, bool print,
                   const SegmentedPrompt& p, const ReuseOptions& ro, EngineOptions eo) {
  const ModelConfig& cfg = model.global_config();
  eo.request_tokens = p.total_tokens() + a.max_tokens + 1;
  eo.chunk_store = true;
  eo.chunk_store_bytes = a.chunk_store_bytes;
  eo.chunk_store_dir = a.chunk_store_dir;
  EngineStores stores = build_engine_stores(model, m.ckpt, eo);
  KvStore& store = stores.kv;
  ChunkStore& chunks = *stores.chunks;
  PrefillOutcome pre = prefill_with_reuse(model, *store.cache, 0, p, &chunks, ro);
  GenerateOptions opts;
  opts.max_tokens = a.max_tokens;
  opts.sampling.temperature = a.temperature;
  opts.sampling.top_p = a.top_p;
  opts.sampling.top_k = a.top_k;
  opts.sampling.seed = a.seed;
  opts.stop_at_eos = !a.ignore_eos;
  StreamDecoder stream(*m.tokenizer);
  GenerateResult r = decode_from(model, *store.cache, 0, pre.last_logits, opts, [&](int32_t id) {
    if (print && !a.json) std::cout << stream.push(id) << std::flush;
    return true;
  });
  if (!print) return;
  const ChunkStoreStats cs = chunks.stats();
  if (a.json) {
    nlohmann::json j;
    j["ids"] = r.ids;
    j["text"] = m.tokenizer->decode(r.ids);
    j["mode"] = a.mode;
    // Tensor-parallel: "flops" below are rank 0's share (each rank counts its own shard).
    if (a.tensor_parallel_size > 1) j["tensor_parallel_size"] = a.tensor_parallel_size;
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
              << pre.flops.total() / 1e9 << " GFLOP"
              << (a.tensor_parallel_size > 1 ? " (rank 0's shard)" : "") << "; chunk store hits "
              << cs.pool_hits + cs.host_hits + cs.disk_hits << ", misses " << cs.misses << "]\n";
  }
}

// A plain prompt on `model` (one rank's, when tensor-parallel); rank 0 prints.
void run_plain(const GenerateArgs& a, LoadedModel& m, Model& model, bool print,
               const std::vector<int32_t>& prompt, const EngineOptions& eo) {
  EngineStores stores = build_engine_stores(model, m.ckpt, eo);
  KvStore& store = stores.kv;
  KvCache& kv = *store.cache;
  GenerateOptions opts;
  opts.max_tokens = a.max_tokens;
  opts.sampling.temperature = a.temperature;
  opts.sampling.top_p = a.top_p;
  opts.sampling.top_k = a.top_k;
  opts.sampling.seed = a.seed;
  opts.prefill_chunk = a.prefill_chunk > 0 ? a.prefill_chunk : default_prefill_chunk(a.backend);
  opts.stop_at_eos = !a.ignore_eos;
  opts.keep_prompt_logits = !a.logits_out.empty();

  std::unique_ptr<StreamDecoder> stream;
  if (print && !a.json && m.tokenizer) stream = std::make_unique<StreamDecoder>(*m.tokenizer);
  GenerateResult r = generate(model, kv, 0, prompt, opts, [&](int32_t id) {
    if (!print) {
    } else if (stream) {
      std::cout << stream->push(id) << std::flush;
    } else if (!a.json) {
      std::cout << id << " " << std::flush;
    }
    return true;
  });
  if (!print) return;
  if (stream) std::cout << stream->finish();
  if (!a.json) std::cout << "\n";

  if (!a.logits_out.empty()) write_safetensors(a.logits_out, {{"logits", r.prompt_logits}});
  if (a.json) {
    nlohmann::json j;
    j["ids"] = r.ids;
    j["text"] = m.tokenizer ? nlohmann::json(m.tokenizer->decode(r.ids)) : nlohmann::json();
    j["prompt_tokens"] = prompt.size();
    if (a.tensor_parallel_size > 1) j["tensor_parallel_size"] = a.tensor_parallel_size;
    // The whole model's FLOPs (a rank computes its shard of them).
    const HeadProfile profile = eo.head_profile.empty() ? HeadProfile::native(model.global_config())
                                                        : HeadProfile::load(eo.head_profile);
    j["flops"] =
        prefill_flops(model.global_config(), profile, 0, static_cast<int64_t>(prompt.size()), 1)
            .to_json();
    j["prefill_ms"] = r.prefill_ms;
    j["decode_ms"] = r.decode_ms;
    std::cout << j.dump() << "\n";
  } else {
    std::cerr << "[prompt " << prompt.size() << " tokens, prefill " << r.prefill_ms << " ms; "
              << r.ids.size() << " tokens in " << r.decode_ms << " ms"
              << (a.tensor_parallel_size > 1
                      ? ", tensor parallel " + std::to_string(a.tensor_parallel_size)
                      : std::string())
              << "]\n";
  }
}

int run_generate(const GenerateArgs& a) {
  const ReuseSettings settings = resolve_reuse_settings(a.model, a.settings);
  const std::string head_profile = settings.head_profile.value_or("");
  const bool segmented = !a.segments.empty() || a.mode != "full";
  ReuseOptions ro;
  ro.mode = parse_reuse_mode(a.mode);
  settings.apply(ro);
  if (const std::string why = settings.refusal(ro.mode); !why.empty() && !a.print_config)
    throw Error(why + "; calibrate again (redknot calibrate) or choose another --mode");
  EngineOptions eo;
  eo.backend = a.backend;
  eo.quantization = a.quantization;
  eo.kv_cache_dtype = a.kv_cache_dtype;
  eo.page_size = a.page_size;
  eo.kv_budget_bytes = a.kv_budget;
  // With segments the mode decides the heads (as in eval and serve); a plain prompt runs on the
  // head profile given, as redknot mode does without segments.
  eo.head_profile = segmented ? head_profile_for_mode(ro.mode, head_profile) : head_profile;
  if (a.print_config) {
    nlohmann::json j = reuse_settings_json(settings, ro);
    j["reuse_mode"] = a.mode;
    j["kv_head_profile"] = eo.head_profile;
    std::cout << j.dump() << std::endl;
    return 0;
  }
  eo.tensor_parallel_size = a.tensor_parallel_size;
  LoadedModel m = load_model(a.model, eo);  // eo.head_profile may reorder the kv heads
  if (segmented) {
    if (!a.prompt_ids.empty()) throw Error("--segment/--mode take --prompt text, not --prompt-ids");
    if (!a.logits_out.empty()) throw Error("--logits-out works with plain prompts only");
    if (!m.tokenizer) throw Error(a.model + ": no tokenizer found; segments are text");
    const SegmentedPrompt p = segmented_prompt(a, *m.tokenizer);  // once, not per rank
    run_on_ranks(m,
                 [&](int rank, Model& model) { run_segmented(a, m, model, rank == 0, p, ro, eo); });
    return 0;
  }
  std::vector<int32_t> prompt;
  if (!a.prompt_ids.empty()) {
    prompt = parse_id_list(a.prompt_ids);  // used as given: no BOS added
  } else {
    if (!m.tokenizer) throw Error(a.model + ": no tokenizer found; use --prompt-ids");
    prompt = m.tokenizer->encode(a.prompt, /*add_special=*/true);
  }
  eo.request_tokens = static_cast<int64_t>(prompt.size()) + a.max_tokens + 1;
  // Every rank runs the same prompt with the same sampling seed on identical gathered logits, so
  // each samples the same tokens; rank 0 prints.
  run_on_ranks(m, [&](int rank, Model& model) { run_plain(a, m, model, rank == 0, prompt, eo); });
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
  add_precision_options(c, &a->quantization, &a->kv_cache_dtype);
  add_tensor_parallel_option(c, &a->tensor_parallel_size);
  c->add_option("--segment", a->segments,
                "a reuse unit (document, system prompt) before --prompt; repeatable");
  c->add_option("--mode", a->mode, "full | prefix | naive | cacheblend | epic | redknot");
  c->add_option("--chunk-store-dir", a->chunk_store_dir, "disk tier of the chunk store");
  add_reuse_settings_options(c, &a->settings);
  add_reuse_pass_options(c, &a->settings);
  c->add_option("--chunk-store-bytes", a->chunk_store_bytes,
                "pool bytes for cached segments (default: 4 requests' worth)");
  c->add_option("--page-size", a->page_size, "KV page size in tokens")->check(CLI::Range(1, 4096));
  c->add_option("--kv-budget", a->kv_budget, "KV pool size in bytes (default: fits the request)");
  c->add_flag("--json", a->json, "print {\"ids\": [...], \"text\": ...}");
  c->add_flag("--print-config", a->print_config,
              "print the resolved reuse settings (JSON) and exit without loading the model");
  c->add_flag("--ignore-eos", a->ignore_eos, "keep generating past EOS");
  c->add_option("--logits-out", a->logits_out, "write prompt logits [len, vocab] as safetensors");
  c->callback([a, c, &action] {
    if (a->prompt.empty() && a->prompt_ids.empty() && !a->print_config)
      throw CLI::ValidationError("--prompt or --prompt-ids is required");
    action = [a] { return run_generate(*a); };
  });
}

}  // namespace redknot::cli
