// `redknot serve`: the OpenAI-compatible HTTP server over one model (continuous batching).
#include <CLI/CLI.hpp>
#include <csignal>
#include <filesystem>
#include <iostream>

#include "commands.h"
#include "common.h"
#include "core/error.h"
#include "engine/engine_setup.h"
#include "model/sparse_ffn.h"

#ifdef REDKNOT_HAS_SERVER
#include "engine/scheduler.h"
#include "reuse/chunk_store.h"
#include "reuse/prefix_cache.h"
#include "server/server.h"
#endif

namespace redknot::cli {

namespace {
struct ServeArgs {
  int32_t tensor_parallel_size = 1;  // > 1: ranks as threads (CPU), --reuse-mode off
  std::string model, host = "127.0.0.1", api_key, backend = "cpu", quantization,
                     kv_cache_dtype = "auto";
  std::string chunk_store_dir, reuse_mode = "redknot", model_id, reuse_fallback = "wait";
  int64_t chunk_store_bytes = 0;
  std::string chunk_store_redis;  // remote tier URL; empty: none
  int32_t chunk_store_redis_admit = 1, chunk_store_redis_connect_ms = 200,
          chunk_store_redis_timeout_ms = 2000;
  int port = 8080;
  int32_t max_batch = 32, max_queue = 256, step_tokens = 0, page_size = 64, threads = 0;
  int64_t kv_budget = 0;
  int64_t max_model_len = 0;
  int64_t max_body_bytes = 8 << 20, max_bytes_in_flight = 512 << 20;
  double gpu_memory_fraction = 0;
  // "auto": on for the CPU backend, off for CUDA, whose attention kernels pick split-KV and
  // tile shapes per batch (row-at-a-time matmuls there would cost ~100x and still not make a
  // request's logits independent of its batch).
  std::string batch_invariant = "auto";
  ReuseSettings settings;  // flags given; the model directory's reuse_settings.json fills the rest
  bool print_config = false;
  bool disable_log_requests = false;
};

// What the server runs with, before any model is loaded (--print-config shows it).
struct ServeSetup {
  ReuseSettings settings;
  ReuseMode mode = ReuseMode::Full;
  bool reuse = false;
  ReuseOptions reuse_opts;
  EngineOptions engine;
};

ServeSetup resolve_serve(const ServeArgs& a) {
  ServeSetup s;
  s.settings = resolve_reuse_settings(a.model, a.settings);
  s.mode = a.reuse_mode == "off" ? ReuseMode::Full : parse_reuse_mode(a.reuse_mode);
  s.reuse = s.mode != ReuseMode::Full;
  if (!a.chunk_store_redis.empty()) {
    // At startup, before the model loads: a bad flag is never a silent "no remote tier".
    if (!s.reuse)
      throw Error("--chunk-store-redis needs the chunk store (a --reuse-mode other than " +
                  a.reuse_mode + ")");
    if (const std::string bad = check_redis_url(a.chunk_store_redis); !bad.empty())
      throw Error("--chunk-store-redis '" + a.chunk_store_redis + "': " + bad);
    if (!redis_kv_available())
      throw Error(
          "--chunk-store-redis: this build has no Redis support (install libhiredis-dev "
          "and rebuild with -DREDKNOT_REDIS=ON)");
  }
  s.reuse_opts.mode = s.mode;
  s.settings.apply(s.reuse_opts);
  const std::string head_profile = s.settings.head_profile.value_or("");
  EngineOptions& eo = s.engine;
  eo.backend = a.backend;
  eo.quantization = a.quantization;
  eo.kv_cache_dtype = a.kv_cache_dtype;
  // "auto": on for the CPU backend, off for CUDA (see ServeArgs::batch_invariant).
  eo.batch_invariant =
      a.batch_invariant == "auto" ? a.backend != "cuda" : a.batch_invariant == "true";
  eo.page_size = a.page_size;
  // The request cache keeps the head profile (redknot requests and plain prompts); requests in a
  // baseline mode (naive, cacheblend, epic, prefix, full) run on a second, all-global cache over
  // the same pool (KvStore::baseline), so each request's mode decides its heads, as in eval and
  // generate (reuse_mode_uses_head_profile).
  eo.head_profile = head_profile;
  eo.kv_budget_bytes = a.kv_budget;
  eo.gpu_memory_fraction = a.gpu_memory_fraction;
  eo.concurrent_requests = a.max_batch;
  eo.chunk_store = s.reuse;
  eo.chunk_store_bytes = a.chunk_store_bytes;
  eo.chunk_store_dir = a.chunk_store_dir;
  eo.chunk_store_redis = a.chunk_store_redis;
  eo.chunk_store_redis_admit = a.chunk_store_redis_admit;
  eo.chunk_store_redis_options.connect_timeout_ms = a.chunk_store_redis_connect_ms;
  eo.chunk_store_redis_options.io_timeout_ms = a.chunk_store_redis_timeout_ms;
  eo.tensor_parallel_size = a.tensor_parallel_size;
  // The scheduler keeps every rank's paged cache in step, but not yet a chunk store, prefix
  // cache or handover per rank: refused rather than served with one rank's store.
  if (a.tensor_parallel_size > 1 && a.reuse_mode != "off")
    throw Error("serve --tensor-parallel-size " + std::to_string(a.tensor_parallel_size) +
                " needs --reuse-mode off: the chunk store is not kept per rank by the server yet "
                "(requests asking a reuse mode are then served full and report fallback "
                "\"reuse_disabled\"; `generate --segment` runs reuse tensor parallel)");
  return s;
}

int print_serve_config(const ServeArgs& a) {
  const ServeSetup s = resolve_serve(a);
  nlohmann::json j = reuse_settings_json(s.settings, s.reuse_opts);
  j["reuse_mode"] = a.reuse_mode;
  // Without a reuse_chunk setting a reuse prefill's forwards take the step budget (run_serve).
  if (!s.settings.reuse_chunk)
    j["reuse_chunk"] = a.step_tokens > 0 ? a.step_tokens : default_prefill_chunk(a.backend);
  // The heads the default mode's requests keep (requests may ask another mode: each mode's
  // requests run on its own cache, head-aware or all-global).
  j["kv_head_profile"] =
      s.reuse ? head_profile_for_mode(s.mode, s.engine.head_profile) : s.engine.head_profile;
  std::cout << j.dump() << std::endl;
  return 0;
}

#ifdef REDKNOT_HAS_SERVER
server::Server* g_server = nullptr;

void on_signal(int) {
  if (g_server) g_server->stop();
}

int run_serve(const ServeArgs& a) {
  std::signal(SIGPIPE, SIG_IGN);  // a client hanging up must not kill the server
  ServeSetup setup = resolve_serve(a);
  const ReuseSettings& settings = setup.settings;
  EngineOptions& eo = setup.engine;
  LoadedModel m = load_model(a.model, eo);
  // Tensor parallel: the scheduler plans on rank 0's model and caches; every rank runs its steps.
  Model& model = m.tp ? *m.tp->models[0] : *m.model;
  if (!m.tokenizer) throw Error(a.model + ": no tokenizer found; the server needs one");
  const Tokenizer* tok = m.tokenizer.get();
  eo.request_tokens = model.config().max_position_embeddings;  // every batch slot at full context
  std::vector<EngineStores> rank_stores;  // ranks 1.. (their heads' pages, same budget)
  for (int r = 1; r < m.tp_size(); ++r)
    rank_stores.push_back(build_engine_stores(*m.tp->models[static_cast<size_t>(r)], m.ckpt, eo));
  EngineStores stores = build_engine_stores(model, m.ckpt, eo);
  KvStore& store = stores.kv;
  std::unique_ptr<ChunkStore>& chunks = stores.chunks;
  // Requests in the baseline modes keep every head's tokens (SPEC §4), beside the head-aware ones;
  // with --reuse-mode off there are none (every request is a plain head-aware prefill).
  const bool reuse_off = a.reuse_mode == "off";
  if (!reuse_off) make_baseline_cache(model, store);

  SchedulerOptions so;
  so.max_batch = a.max_batch;
  so.max_queue = a.max_queue;
  so.step_tokens = a.step_tokens > 0 ? a.step_tokens : default_prefill_chunk(a.backend);
  so.baseline_cache = store.baseline.get();
  // Automatic prefix caching for prefix-mode requests (pages shared with the baseline cache).
  std::unique_ptr<PrefixCache> prefix;
  if (store.baseline) {
    PrefixCacheOptions pco;
    pco.model_fp = model_fingerprint(model.config(), m.ckpt, store.pool->kv_dtype());
    prefix = std::make_unique<PrefixCache>(*store.baseline, pco);
    so.prefix_cache = prefix.get();
  }
  so.reuse_fallback = parse_reuse_fallback(a.reuse_fallback);
  so.reuse = setup.reuse_opts;
  // A reuse prefill's forwards take at most this many rows, one per step like prefill chunks
  // (the settings' reuse_chunk, else the step budget); eval and generate give the same answers
  // with the same reuse_chunk.
  if (!settings.reuse_chunk) so.reuse.chunk = so.step_tokens;
  so.chunk_store = chunks.get();
  // Prefill/decode handover (kv_export / kv_import) through the same Redis, on its own client.
  std::unique_ptr<RemoteKv> handover;
  if (!a.chunk_store_redis.empty()) {
    handover = make_redis_kv(a.chunk_store_redis, eo.chunk_store_redis_options);
    so.handover = handover.get();
    so.handover_model_fp = model_fingerprint(model.config(), m.ckpt);
  }
  so.redknot_disabled = settings.redknot_disabled.value_or("");
  RankGroup ranks;
  if (m.tp) {
    ranks.group = m.tp->group.get();
    ranks.ranks.push_back({&model, store.cache.get(), store.baseline.get()});
    for (size_t r = 0; r < rank_stores.size(); ++r)
      ranks.ranks.push_back({m.tp->models[r + 1].get(), rank_stores[r].kv.cache.get(),
                             rank_stores[r].kv.baseline.get()});
    so.ranks = &ranks;
  }
  Scheduler sched(model, *store.cache, so);

  server::ServerOptions o;
  o.host = a.host;
  o.port = a.port;
  o.api_key = a.api_key;
  o.max_model_len = a.max_model_len;
  o.threads = a.threads;
  o.max_body_bytes = static_cast<size_t>(a.max_body_bytes);
  o.max_bytes_in_flight = static_cast<size_t>(a.max_bytes_in_flight);
  o.backend = a.backend;
  o.head_profile = eo.head_profile;
  o.chunk_store_dir = a.chunk_store_dir;
  o.chunk_store_redis = a.chunk_store_redis;
  o.reuse_mode = a.reuse_mode;
  o.batch_invariant = m.is_batch_invariant();
  o.log_requests = !a.disable_log_requests;
  if (chunks) o.chunk_stats = [&chunks] { return chunks->stats(); };
  std::filesystem::path p(a.model);
  if (p.filename().empty()) p = p.parent_path();  // "dir/"
  o.model_id = a.model_id.empty() ? p.stem().string() : a.model_id;
  server::Server srv(*tok, model.global_config(), sched, o);  // not rank 0's shard
  const int port = srv.bind();
  g_server = &srv;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::cout << "redknot serve: model '" << o.model_id << "', " << store.pool->num_pages()
            << " KV pages of " << a.page_size << " tokens"
            << (m.tp ? " per rank, tensor parallel " + std::to_string(m.tp_size()) : "")
            << ", reuse settings from " << (settings.source.empty() ? "defaults" : settings.source)
            << ", listening on http://" << a.host << ":" << port << std::endl;
  if (!reuse_off && !settings.redknot_disabled && store.cache->global_head_fraction() >= 1)
    std::cout << "redknot serve: this model has no head profile: redknot requests keep every head "
                 "global (usage.reuse.global_head_fraction 1, /metrics "
                 "redknot_kv_global_head_fraction); `redknot calibrate --model "
              << a.model << "` makes one" << std::endl;
  if (settings.redknot_disabled)
    std::cout << "redknot serve: redknot mode is disabled by " << settings.source << " ("
              << *settings.redknot_disabled
              << "); redknot requests are served with full prefill and report fallback "
                 "\"redknot_disabled\" (usage.reuse, /metrics)"
              << std::endl;
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
  c->add_option("--max-body-bytes", a->max_body_bytes, "request body size at most (then 413)")
      ->check(CLI::Range(int64_t{1024}, int64_t{1} << 32));
  c->add_option("--max-bytes-in-flight", a->max_bytes_in_flight,
                "bytes of unfinished requests buffered over all connections at most (then 503): "
                "bounds the memory concurrent large uploads can take")
      ->check(CLI::Range(int64_t{1} << 20, int64_t{1} << 40));
  c->add_option("--backend", a->backend, "cpu | reference | cuda");
  add_precision_options(c, &a->quantization, &a->kv_cache_dtype);
  add_tensor_parallel_option(c, &a->tensor_parallel_size);
  c->add_option("--threads", a->threads, "HTTP worker threads (0: automatic)");
  c->add_option("--batch-invariant", a->batch_invariant,
                "auto | true | false: row-at-a-time matmuls so that batching never changes a "
                "request's output (auto: on for cpu, off for cuda)")
      ->check(CLI::IsMember({"auto", "true", "false"}));
  c->add_option("--chunk-store-dir", a->chunk_store_dir,
                "disk tier of the chunk store (cached segments survive restarts)");
  c->add_option("--chunk-store-bytes", a->chunk_store_bytes,
                "KV pool bytes for cached segments (default: a third of the pool)");
  c->add_option("--chunk-store-redis", a->chunk_store_redis,
                "remote tier of the chunk store, shared with other servers: redis://host:port or "
                "unix:///path.sock (segments in head-major shards; Redis's maxmemory + LRU bound "
                "it)");
  c->add_option("--chunk-store-redis-admit", a->chunk_store_redis_admit,
                "accesses a cached segment needs before it is written to Redis (1: every "
                "prefilled segment is shared)")
      ->check(CLI::PositiveNumber);
  c->add_option("--chunk-store-redis-connect-ms", a->chunk_store_redis_connect_ms,
                "Redis connect timeout in ms (a failed connect is retried with backoff)")
      ->check(CLI::PositiveNumber);
  c->add_option("--chunk-store-redis-timeout-ms", a->chunk_store_redis_timeout_ms,
                "Redis read/write timeout in ms (a timeout is a miss)")
      ->check(CLI::PositiveNumber);
  add_reuse_settings_options(c, &a->settings);
  add_reuse_pass_options(c, &a->settings);
  c->add_flag("--print-config", a->print_config,
              "print the resolved reuse settings (JSON) and exit without loading the model");
  c->add_flag("--disable-log-requests", a->disable_log_requests,
              "no per-request log line on stderr (as vLLM's flag)");
  c->add_option("--reuse-fallback", a->reuse_fallback,
                "when a reuse prefill finds no free KV pages: wait (requeue; answers never depend "
                "on load) | dense (prefill densely now; reported) | reject (fail the request)")
      ->check(CLI::IsMember({"wait", "dense", "reject"}));
  c->add_option(
      "--reuse-mode", a->reuse_mode,
      "default chunk reuse mode: redknot | prefix | naive | cacheblend | epic | full | off");
  c->callback([a, &action] {
    if (a->print_config) {
      action = [a] { return print_serve_config(*a); };
      return;
    }
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
