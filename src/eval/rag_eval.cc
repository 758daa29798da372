#include "eval/rag_eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "engine/engine_setup.h"
#include "engine/sampler.h"
#include "reuse/chunk_prefill.h"

namespace redknot {

namespace {
double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i =
      static_cast<size_t>(std::min<double>(v.size() - 1, std::floor(q * (v.size() - 1) + 0.5)));
  return v[i];
}

// Greedy answer: stops at EOS or at a token whose text holds a newline.
std::vector<int32_t> decode_answer(Model& model, KvCache& kv, SeqId seq, const Tokenizer& tok,
                                   std::vector<float> logits, int32_t max_tokens,
                                   const std::vector<bool>& stops) {
  std::vector<int32_t> out;
  const int64_t V = model.config().vocab_size;
  for (int32_t i = 0; i < max_tokens; ++i) {
    const int32_t next = argmax(logits.data(), V);
    if (stops[next]) break;
    out.push_back(next);
    if (i + 1 == max_tokens) break;
    Batch b;
    b.add_sequence(seq, {next}, kv.next_position(seq));
    Tensor l = model.forward(b, kv);
    logits.assign(l.data<float>(), l.data<float>() + V);
  }
  return out;
}
}  // namespace

double cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    dot += double(a[i]) * b[i];
    na += double(a[i]) * a[i];
    nb += double(b[i]) * b[i];
  }
  return (na > 0 && nb > 0) ? dot / std::sqrt(na * nb) : 0.0;
}

nlohmann::json SampleResult::to_json() const {
  return {{"id", id},
          {"task", task},
          {"prediction", prediction},
          {"em", em},
          {"f1", f1},
          {"top1_match", top1_match},
          {"logits_cos", logits_cos},
          {"ttft_ms", ttft_ms}};
}

nlohmann::json EvalReport::to_json() const {
  nlohmann::json tasks = nlohmann::json::object();
  for (const auto& [name, t] : per_task)
    tasks[name] = {{"n", t.n},
                   {"em", t.em},
                   {"f1", t.f1},
                   {"top1_match", t.top1_match},
                   {"logits_cos", t.logits_cos}};
  return {{"mode", mode},
          {"n", n},
          {"n_requested", n_requested},
          {"truncated", truncated()},
          {"em", em},
          {"f1", f1},
          {"top1_match", top1_match},
          {"logits_cos", logits_cos},
          {"ttft_ms_p50", ttft_ms_p50},
          {"ttft_ms_p90", ttft_ms_p90},
          {"flops", flops},
          {"flops_full", flops_full},
          {"flops_reduction", flops_full > 0 ? 1.0 - flops / flops_full : 0.0},
          {"flops_ledger", ledger.to_json()},
          {"reused_tokens", reused_tokens},
          {"prompt_tokens", prompt_tokens},
          {"global_head_fraction", global_head_fraction},
          {"chunk_store",
           {{"pool_hits", chunk_store.pool_hits},
            {"misses", chunk_store.misses},
            {"prefills", chunk_store.prefills},
            {"pool_bytes", chunk_store.pool.bytes}}},
          {"tasks", tasks}};
}

EvalReport run_rag_eval(Model& model, const Checkpoint& ckpt, const Tokenizer& tok,
                        const std::vector<RagSample>& samples, const EvalOptions& opts,
                        const std::function<void(int64_t, int64_t)>& progress) {
  const ModelConfig& cfg = model.config();
  const int64_t V = cfg.vocab_size;
  std::vector<bool> stops(V, false);
  for (int32_t id : tok.eos_ids())
    if (id >= 0 && id < V) stops[id] = true;
  for (int32_t id = 0; id < V && id < tok.vocab_size(); ++id)
    if (tok.decode(std::vector<int32_t>{id}).find('\n') != std::string::npos) stops[id] = true;

  std::vector<SegmentedPrompt> prompts;
  int64_t longest = 0;
  for (const RagSample& s : samples) {
    prompts.push_back(build_rag_prompt(tok, s));
    longest = std::max(longest, prompts.back().total_tokens());
  }
  const ReuseMode mode = opts.reuse.mode;
  const bool is_full = mode == ReuseMode::Full;
  // One pool for the request and the chunk store (the engine assembly); the mode decides the
  // heads: baselines run the model's own attention, redknot the head profile.
  const int64_t tokens = longest + opts.max_answer_tokens + 1;
  EngineOptions eo;
  eo.page_size = opts.kv.page_size;
  eo.kv_cache_dtype = opts.kv.kv_cache_dtype;
  eo.head_profile = head_profile_for_mode(mode, opts.kv.head_profile_path);
  eo.request_tokens = tokens;
  eo.chunk_store = true;
  eo.chunk_store_bytes = opts.chunk_store_bytes;
  // Evictions stay misses that are prefilled again: the host tier would turn them into hits.
  eo.chunk_store_host_bytes = 0;
  EngineStores stores = build_engine_stores(model, ckpt, eo);
  KvStore& store = stores.kv;
  ChunkStore& chunks = *stores.chunks;
  PrefixIndex prefix_index;

  // The reference: full prefill on the model's own attention, in a pool of its own.
  EngineOptions full_eo = eo;
  full_eo.head_profile.clear();
  full_eo.chunk_store = false;
  KvStore full_store = std::move(build_engine_stores(model, ckpt, full_eo).kv);

  EvalReport r;
  r.mode = reuse_mode_name(mode);
  r.global_head_fraction = store.cache->global_head_fraction();
  r.n_requested = static_cast<int64_t>(samples.size());
  std::vector<double> ttft;
  for (size_t i = 0; i < samples.size(); ++i) {
    if (opts.deadline && std::chrono::steady_clock::now() >= *opts.deadline) break;
    const RagSample& s = samples[i];
    const SegmentedPrompt& prompt = prompts[i];
    // Offline phase (untimed): the segments this mode reuses are in the chunk store.
    std::vector<ChunkStore::Handle> warm;
    if (mode == ReuseMode::Naive || mode == ReuseMode::CacheBlend || mode == ReuseMode::Epic)
      warm = acquire_or_prefill_all(model, chunks, prompt.segments);
    if (mode == ReuseMode::RedKnot && !prompt.segments.empty())
      warm.push_back(acquire_or_prefill(model, chunks, prompt.segments[0]));

    PrefillOutcome got =
        prefill_with_reuse(model, *store.cache, 0, prompt, &chunks, opts.reuse, &prefix_index);
    warm.clear();
    std::vector<int32_t> answer =
        decode_answer(model, *store.cache, 0, tok, got.last_logits, opts.max_answer_tokens, stops);
    store.cache->remove_sequence(0);
    if (mode == ReuseMode::Prefix && !prompt.segments.empty()) {
      // The finished request's prefix chain stays cached for the requests after it.
      std::vector<int32_t> chain;
      for (const auto& seg : prompt.segments) chain.insert(chain.end(), seg.begin(), seg.end());
      if (acquire_or_prefill(model, chunks, chain)) prefix_index.record(prompt);
    }

    FlopsLedger full_flops =
        prefill_flops(cfg, HeadProfile::native(cfg), 0, prompt.total_tokens(), 1);
    double top1 = 1, cos = 1;
    std::vector<float>* cached = nullptr;
    if (opts.full_logits) {
      if (opts.full_logits->size() < samples.size()) opts.full_logits->resize(samples.size());
      cached = &(*opts.full_logits)[i];
      if (is_full && cached->empty()) *cached = got.last_logits;
    }
    if (!is_full) {
      std::vector<float> ref_logits;
      if (cached && !cached->empty()) {
        ref_logits = *cached;
      } else {
        ref_logits = prefill_full(model, *full_store.cache, 0, prompt).last_logits;
        full_store.cache->remove_sequence(0);
        if (cached) *cached = ref_logits;
      }
      top1 = argmax(ref_logits.data(), V) == argmax(got.last_logits.data(), V) ? 1 : 0;
      cos = cosine(ref_logits, got.last_logits);
    }
    const std::string pred = tok.decode(answer, true);
    const double em = exact_match(pred, s.answers), f1 = f1_score(pred, s.answers);
    TaskStats& t = r.per_task[s.task.empty() ? "all" : s.task];
    ++t.n;
    t.em += em, t.f1 += f1, t.top1_match += top1, t.logits_cos += cos;
    ++r.n;
    r.em += em, r.f1 += f1, r.top1_match += top1, r.logits_cos += cos;
    r.flops += got.flops.total();
    r.flops_full += full_flops.total();
    r.ledger += got.flops;
    r.reused_tokens += got.reused_tokens;
    r.prompt_tokens += prompt.total_tokens();
    ttft.push_back(got.ms);
    r.samples.push_back({s.id, s.task, pred, em, f1, top1, cos, got.ms});
    if (progress) progress(static_cast<int64_t>(i + 1), static_cast<int64_t>(samples.size()));
  }
  auto avg = [](double& x, int64_t n) { x = n ? x / n : 0; };
  avg(r.em, r.n), avg(r.f1, r.n), avg(r.top1_match, r.n), avg(r.logits_cos, r.n);
  for (auto& [name, t] : r.per_task)
    avg(t.em, t.n), avg(t.f1, t.n), avg(t.top1_match, t.n), avg(t.logits_cos, t.n);
  r.ttft_ms_p50 = percentile(ttft, 0.5);
  r.ttft_ms_p90 = percentile(ttft, 0.9);
  r.chunk_store = chunks.stats();
  return r;
}

}  // namespace redknot
