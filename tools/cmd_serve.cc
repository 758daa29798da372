// `redknot serve`: the OpenAI-compatible HTTP server over one model (continuous batching).
#include <CLI/CLI.hpp>
#include <csignal>
#include <filesystem>
#include <iostream>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "model/sparse_ffn.h"

#ifdef REDKNOT_HAS_SERVER
#include "backend/builtin.h"
#include "engine/batch_invariant_backend.h"
#include "engine/kv_setup.h"
#include "engine/scheduler.h"
#include "reuse/chunk_store.h"
#include "reuse/prefix_cache.h"
#include "server/server.h"
#endif

namespace redknot::cli {

namespace {
struct ServeArgs {
  std::string model, head_profile, host = "127.0.0.1", api_key, backend = "cpu";
  std::string chunk_store_dir, reuse_mode = "redknot", model_id, reuse_fallback = "wait";
  int32_t reuse_chunk = 0;  // 0: the step budget
  int64_t chunk_store_bytes = 0;
  int port = 8080;
  int32_t max_batch = 32, max_queue = 256, step_tokens = 0, page_size = 64, threads = 0;
  int64_t kv_budget = 0;
  int64_t max_model_len = 0;
  double gpu_memory_fraction = 0;
  // "auto": on for the CPU backend, off for CUDA, whose attention kernels pick split-KV and
  // tile shapes per batch (row-at-a-time matmuls there would cost ~100x and still not make a
  // request's logits independent of its batch).
  std::string batch_invariant = "auto";
  bool sparse_ffn = true;             // redknot mode's Sparse FFN (SPEC §4)
  bool skip_dead_rows = true;         // redknot mode: dead-row skipping past the last global layer
  bool query_full_attention = false;  // redknot mode: the query's rows attend with every head
  SparseFfnConfig sparse_cfg;         // its tiers
};

#ifdef REDKNOT_HAS_SERVER
server::Server* g_server = nullptr;

void on_signal(int) {
  if (g_server) g_server->stop();
}

int run_serve(const ServeArgs& a) {
  std::signal(SIGPIPE, SIG_IGN);  // a client hanging up must not kill the server
  register_builtin_backends();
  // Built by hand instead of load_model(): the model may sit on the batch-invariant wrapper.
  Checkpoint ckpt = load_checkpoint(a.model);
  std::unique_ptr<Backend> backend = create_backend(a.backend);
  std::unique_ptr<Backend> wrapped;
  const bool batch_invariant =
      a.batch_invariant == "auto" ? a.backend != "cuda" : a.batch_invariant == "true";
  if (batch_invariant) wrapped = std::make_unique<BatchInvariantBackend>(*backend);
  Model model(ckpt, wrapped ? *wrapped : *backend);
  std::unique_ptr<Tokenizer> tok = load_tokenizer_for(a.model, &ckpt);
  if (!tok) throw Error(a.model + ": no tokenizer found; the server needs one");

  KvOptions kvo;
  kvo.page_size = a.page_size;
  kvo.budget_bytes = a.kv_budget;
  if (a.gpu_memory_fraction > 0) {
    // Weights are on the device already: the pool takes this share of what is left.
    kvo.budget_bytes = static_cast<int64_t>(
        a.gpu_memory_fraction * static_cast<double>(model.backend().free_memory_bytes()));
    if (kvo.budget_bytes <= 0) throw Error("--gpu-memory-fraction: no free device memory reported");
  }
  // Default pool: every batch slot at full context, all heads global.
  kvo.tokens = model.config().max_position_embeddings * a.max_batch;
  kvo.head_profile_path = a.head_profile;
  // Chunk reuse: cached segments live in the same pool, beside the requests' KV.
  const ReuseMode mode = a.reuse_mode == "off" ? ReuseMode::Full : parse_reuse_mode(a.reuse_mode);
  const bool reuse = mode != ReuseMode::Full;
  if (reuse && kvo.budget_bytes <= 0) {
    // Every batch slot at full context (kvo.tokens spans them all), plus page slack per slot.
    const int64_t request_bytes =
        kv_bytes_for(model, kvo.page_size, kvo.tokens / a.max_batch, a.max_batch);
    kvo.budget_bytes =
        request_bytes + (a.chunk_store_bytes > 0 ? a.chunk_store_bytes : request_bytes / 2);
  }
  KvStore store = make_kv_store(model, kvo);
  // Requests in the baseline modes keep every head's tokens (SPEC §4), beside the head-aware ones.
  make_baseline_cache(model, store);
  std::unique_ptr<ChunkStore> chunks;
  if (reuse) {
    ChunkStoreOptions cso;
    const int64_t pool_bytes = int64_t{store.pool->num_pages()} * store.pool->bytes_per_page();
    cso.pool_budget_bytes = a.chunk_store_bytes > 0 ? a.chunk_store_bytes : pool_bytes / 3;
    cso.host_budget_bytes = int64_t{1} << 30;
    cso.model_fp = model_fingerprint(model.config(), ckpt);
    if (!a.chunk_store_dir.empty()) {
      cso.disk_dir = a.chunk_store_dir;
      cso.disk_budget_bytes = int64_t{16} << 30;
      // New segments reach disk within moments, so a crash or kill -9 keeps the cache.
      cso.write_through = true;
    }
    chunks = std::make_unique<ChunkStore>(model, *store.pool, cso);
  }

  SchedulerOptions so;
  so.max_batch = a.max_batch;
  so.max_queue = a.max_queue;
  so.step_tokens = a.step_tokens > 0 ? a.step_tokens : default_prefill_chunk(a.backend);
  so.baseline_cache = store.baseline.get();
  // Automatic prefix caching for prefix-mode requests (pages shared with the baseline cache).
  PrefixCacheOptions pco;
  pco.model_fp = model_fingerprint(model.config(), ckpt);
  PrefixCache prefix(*store.baseline, pco);
  so.prefix_cache = &prefix;
  so.reuse_fallback = parse_reuse_fallback(a.reuse_fallback);
  // A reuse prefill's forwards take at most this many rows (one per step, like prefill chunks);
  // eval and generate give the same answers with the same --reuse-chunk.
  so.reuse.chunk = a.reuse_chunk > 0 ? a.reuse_chunk : so.step_tokens;
  if (chunks) {
    so.reuse.mode = mode;
    so.reuse.sparse_ffn_enabled = a.sparse_ffn;
    so.reuse.skip_dead_rows = a.skip_dead_rows;
    so.reuse.query_full_attention = a.query_full_attention;
    so.reuse.sparse_ffn = a.sparse_cfg;
    so.chunk_store = chunks.get();
  }
  Scheduler sched(model, *store.cache, so);

  server::ServerOptions o;
  o.host = a.host;
  o.port = a.port;
  o.api_key = a.api_key;
  o.max_model_len = a.max_model_len;
  o.threads = a.threads;
  o.backend = a.backend;
  o.head_profile = a.head_profile;
  o.chunk_store_dir = a.chunk_store_dir;
  o.reuse_mode = a.reuse_mode;
  o.batch_invariant = batch_invariant;
  if (chunks) o.chunk_stats = [&chunks] { return chunks->stats(); };
  std::filesystem::path p(a.model);
  if (p.filename().empty()) p = p.parent_path();  // "dir/"
  o.model_id = a.model_id.empty() ? p.stem().string() : a.model_id;
  server::Server srv(*tok, model.config(), sched, o);
  const int port = srv.bind();
  g_server = &srv;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::cout << "redknot serve: model '" << o.model_id << "', " << store.pool->num_pages()
            << " KV pages of " << a.page_size << " tokens, listening on http://" << a.host << ":"
            << port << std::endl;
  srv.serve();
  g_server = nullptr;
  std::cout << "redknot serve: stopped" << std::endl;
  return 0;
}
#endif
}  // namespace

void add_serve_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* c = app.add_subcommand("serve", "OpenAI-compatible HTTP server");
  c->add_option("--model", a->model, "HF model directory or GGUF file")->required();
  c->add_option("--model-id,--served-model-name", a->model_id,
                "name clients send as \"model\" (default: file stem)");
  c->add_option("--head-profile", a->head_profile, "head profile JSON");
  c->add_option("--host", a->host, "address to bind");
  c->add_option("--port", a->port, "port (0: any free port)")->check(CLI::Range(0, 65535));
  c->add_option("--max-batch,--max-num-seqs", a->max_batch, "running requests at most")
      ->check(CLI::Range(1, 4096));
  c->add_option("--max-queue", a->max_queue, "waiting requests at most (then 429)")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option("--step-tokens", a->step_tokens,
                "tokens per engine step, chunked prefill (0: 512 on the CPU, 4096 on CUDA)")
      ->check(CLI::Range(0, 1 << 20));
  auto* kvb = c->add_option("--kv-budget", a->kv_budget, "KV pool size in bytes");
  c->add_option("--gpu-memory-fraction,--gpu-memory-utilization", a->gpu_memory_fraction,
                "KV pool = this share of the device memory left after the weights")
      ->check(CLI::Range(0.0, 1.0))
      ->excludes(kvb);
  c->add_option("--max-model-len", a->max_model_len,
                "prompt + max_tokens at most per request (0: the model's context length)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  c->add_option("--page-size", a->page_size, "KV page size in tokens")->check(CLI::Range(1, 4096));
  c->add_option("--api-key", a->api_key, "require 'Authorization: Bearer KEY'");
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  c->add_option("--threads", a->threads, "HTTP worker threads (0: automatic)");
  c->add_option("--batch-invariant", a->batch_invariant,
                "auto | true | false: row-at-a-time matmuls so that batching never changes a "
                "request's output (auto: on for cpu, off for cuda)")
      ->check(CLI::IsMember({"auto", "true", "false"}));
  c->add_option("--chunk-store-dir", a->chunk_store_dir,
                "disk tier of the chunk store (cached segments survive restarts)");
  c->add_option("--chunk-store-bytes", a->chunk_store_bytes,
                "KV pool bytes for cached segments (default: a third of the pool)");
  c->add_option("--sparse-ffn", a->sparse_ffn,
                "redknot mode runs the FFN only for important tokens (true | false)");
  c->add_option("--skip-dead-rows", a->skip_dead_rows,
                "redknot mode skips rows no later token reads past the last global layer (exact; "
                "true | false)");
  c->add_option("--query-full-attention", a->query_full_attention,
                "redknot mode: the query's rows attend with every head global, local heads over "
                "the whole prompt (beyond the paper; true | false)");
  add_sparse_ffn_options(c, &a->sparse_cfg);
  c->add_option("--reuse-fallback", a->reuse_fallback,
                "when a reuse prefill finds no free KV pages: wait (requeue; answers never depend "
                "on load) | dense (prefill densely now; reported) | reject (fail the request)")
      ->check(CLI::IsMember({"wait", "dense", "reject"}));
  c->add_option("--reuse-chunk", a->reuse_chunk,
                "rows per forward of a reuse prefill, one forward per step (0: --step-tokens); "
                "Sparse FFN ranks rows per forward, so eval/generate match with the same value")
      ->check(CLI::Range(0, 1 << 20));
  c->add_option(
      "--reuse-mode", a->reuse_mode,
      "default chunk reuse mode: redknot | prefix | naive | cacheblend | epic | full | off");
  c->callback([a, &action] {
#ifdef REDKNOT_HAS_SERVER
    action = [a] { return run_serve(*a); };
#else
    action = [] {
      std::cerr << "error: built without the server (REDKNOT_SERVER=OFF)\n";
      return 1;
    };
#endif
  });
}

}  // namespace redknot::cli
