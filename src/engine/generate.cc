#include "engine/generate.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/error.h"

namespace redknot {

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

GenerateResult generate(Model& model, KvCache& kv, SeqId seq, const std::vector<int32_t>& prompt,
                        const GenerateOptions& opts, const TokenCallback& on_token) {
  if (prompt.empty()) throw Error("the prompt is empty");
  if (opts.max_tokens < 0) throw Error("max_tokens must be >= 0");
  if (opts.prefill_chunk <= 0) throw Error("prefill chunk must be positive");
  const ModelConfig& cfg = model.config();
  const int64_t vocab = cfg.vocab_size;
  for (int32_t t : prompt)
    if (t < 0 || t >= vocab)
      throw Error("prompt token id " + std::to_string(t) + " outside the vocabulary [0, " +
                  std::to_string(vocab) + ")");
  if (!kv.has_sequence(seq)) kv.add_sequence(seq);
  opts.sampling.validate();
  GenerateResult res;
  if (opts.keep_prompt_logits)
    res.prompt_logits = Tensor::host(DType::F32, {static_cast<int64_t>(prompt.size()), vocab});

  auto t0 = std::chrono::steady_clock::now();
  Tensor last_logits;
  for (size_t start = 0; start < prompt.size(); start += opts.prefill_chunk) {
    size_t end = std::min(prompt.size(), start + static_cast<size_t>(opts.prefill_chunk));
    Batch b;
    std::vector<int32_t> chunk(prompt.begin() + start, prompt.begin() + end);
    b.add_sequence(seq, chunk, kv.next_position(seq), true, opts.keep_prompt_logits);
    Tensor logits = model.forward(b, kv);
    if (opts.keep_prompt_logits) {
      std::memcpy(res.prompt_logits.data<float>() + start * vocab, logits.data<float>(),
                  static_cast<size_t>(logits.nbytes()));
      last_logits = logits.rows_slice(logits.rows() - 1, logits.rows());
    } else {
      last_logits = logits;
    }
  }
  res.prefill_ms = ms_since(t0);
  res.first_logits.assign(last_logits.data<float>(), last_logits.data<float>() + vocab);

  GenerateResult dec = decode_from(model, kv, seq, res.first_logits, opts, on_token);
  res.ids = std::move(dec.ids);
  res.decode_ms = dec.decode_ms;
  res.stopped_at_eos = dec.stopped_at_eos;
  return res;
}

GenerateResult decode_from(Model& model, KvCache& kv, SeqId seq, std::vector<float> first_logits,
                           const GenerateOptions& opts, const TokenCallback& on_token) {
  const ModelConfig& cfg = model.config();
  const int64_t vocab = cfg.vocab_size;
  if (static_cast<int64_t>(first_logits.size()) != vocab) throw Error("decode: logits size");
  Sampler sampler(opts.sampling);
  // Greedy steps take the argmax on the device: the ids come back, not [vocab] logits.
  const bool greedy = !sampler.needs_logits();
  GenerateResult res;
  auto t1 = std::chrono::steady_clock::now();
  int32_t next = sampler.sample(first_logits.data(), vocab);
  for (int32_t i = 0; i < opts.max_tokens; ++i) {
    res.ids.push_back(next);
    sampler.observe(next);
    bool is_eos = std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), next) !=
                  cfg.eos_token_ids.end();
    if (on_token && !on_token(next)) break;
    if (is_eos && opts.stop_at_eos) {
      res.stopped_at_eos = true;
      break;
    }
    if (i + 1 == opts.max_tokens) break;
    Batch b;
    b.add_sequence(seq, {next}, kv.next_position(seq));
    if (greedy) {
      next = model.forward_greedy(b, kv).at(0);
    } else {
      Tensor l = model.forward(b, kv);
      next = sampler.sample(l.data<float>(), vocab);
    }
  }
  res.decode_ms = ms_since(t1);
  return res;
}

}  // namespace redknot
