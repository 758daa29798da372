// Single-sequence generation: chunked prefill of the prompt, then token-by-token decode.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/tensor.h"
#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "model/model.h"

namespace redknot {

struct GenerateOptions {
  int32_t max_tokens = 32;
  SamplingParams sampling;
  int32_t prefill_chunk = 512;  // prompt tokens per forward pass
  bool stop_at_eos = true;
  bool keep_prompt_logits = false;  // return logits of every prompt position
};

struct GenerateResult {
  std::vector<int32_t> ids;         // generated tokens (EOS included when it stopped there)
  Tensor prompt_logits;             // [prompt_len, vocab] f32 when keep_prompt_logits
  std::vector<float> first_logits;  // logits that chose the first generated token
  double prefill_ms = 0, decode_ms = 0;
  bool stopped_at_eos = false;
};

// Called with each generated id; returning false stops generation.
using TokenCallback = std::function<bool(int32_t)>;

// Decodes from the logits of a sequence's last prompt token (the prompt already in `kv`).
// Fills ids, decode_ms and stopped_at_eos of the result.
GenerateResult decode_from(Model& model, KvCache& kv, SeqId seq, std::vector<float> first_logits,
                           const GenerateOptions& opts, const TokenCallback& on_token = nullptr);

// Runs `prompt` as sequence `seq` (created if absent) and generates. The sequence stays in `kv`.
GenerateResult generate(Model& model, KvCache& kv, SeqId seq, const std::vector<int32_t>& prompt,
                        const GenerateOptions& opts, const TokenCallback& on_token = nullptr);

}  // namespace redknot
