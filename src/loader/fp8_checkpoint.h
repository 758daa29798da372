// FP8 linear weights in a checkpoint. The layouts users download are normalised at load time into
// one canonical form that the model uploads: "<proj>.weight" F8_E4M3 [N, K] beside
// "<proj>.weight_scale" f32, either [N] (one scale per output channel; a per-tensor scale is
// expanded to [N]) or [ceil(N/128), ceil(K/128)] (128x128 blocks). Scales are dequantization
// multipliers: w[n, k] = e4m3(code[n, k]) * scale. Only the decoder's linear projections
// (q/k/v/o, gate/up/down) may be FP8; embeddings, norms and lm_head stay as stored.
//
// Layouts read (config.json `quantization_config`):
// - quant_method "compressed-tensors" (llm-compressor's "FP8-Dynamic" / "FP8" Llama-3.x
//   checkpoints): `weight` F8_E4M3 + `weight_scale` [N, 1] (channel) or scalar (tensor); an
//   optional static `input_scale` is dropped: activations are always quantized per token.
// - quant_method "fp8" with weight_block_size [128, 128] (Qwen3-FP8, DeepSeek): `weight` F8_E4M3
//   + `weight_scale_inv` [ceil(N/128), ceil(K/128)] (despite its name, also a multiplier);
//   without weight_block_size (vLLM's per-tensor fp8): `weight_scale` scalar.
#pragma once
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "loader/checkpoint.h"

namespace redknot {

// The weight quantization a checkpoint ends up with (Checkpoint::weight_quant).
inline constexpr const char* kQuantNone = "";
inline constexpr const char* kQuantFp8Channel = "fp8-channel";
inline constexpr const char* kQuantFp8Block = "fp8-block128";

// True for "model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.weight".
bool is_fp8_linear_name(const std::string& name);

// Rewrites `tensors` (loaded from a HF directory whose config.json is `config`) into the
// canonical form above and returns kQuantNone, kQuantFp8Channel or kQuantFp8Block. Throws Error
// naming `source` for an unsupported quant_method or scheme, an FP8 tensor that is not a linear
// projection or has no scale, or a scale of the wrong shape.
std::string normalize_fp8_checkpoint(const nlohmann::json& config,
                                     std::map<std::string, Tensor>& tensors,
                                     const std::string& source);

// `--quantization fp8`: quantizes every linear projection not already FP8 to e4m3 with one scale
// per output channel (absmax / 448, fp8_quantize_row), as host tensors in the canonical form.
// Sets ckpt.weight_quant (kQuantFp8Channel, or unchanged for an FP8 checkpoint).
void quantize_checkpoint_fp8(Checkpoint& ckpt);

// Applies a `--quantization` value: "" / "none" leaves the checkpoint as stored, "fp8" calls
// quantize_checkpoint_fp8; anything else is an Error listing the supported values.
void apply_quantization(Checkpoint& ckpt, const std::string& method);

// The dequantized f32 copy of a canonical FP8 weight (tests, tools). codes: [N, K] f8;
// scale: [N] or [ceil(N/128), ceil(K/128)] f32
Tensor dequantize_fp8_weight(const Tensor& codes, const Tensor& scale);

}  // namespace redknot
