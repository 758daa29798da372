// The backend seam: tensors that live on one device and the op table the model is written in.
// Model code calls only these ops, so the reference, CPU and CUDA backends are interchangeable.
// Every op has a plain implementation in reference/ (the oracle) and op_parity_test checks every
// registered backend against it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace redknot {

// Masking rule of one attention call, by absolute token positions: key j is visible to query i
// when kpos[j] <= qpos[i] and (window == 0 or qpos[i] - kpos[j] < window or kpos[j] < sink).
// window counts the query token itself (HF sliding_window semantics).
struct AttentionMask {
  float scale = 1.0f;  // softmax scale, usually 1/sqrt(head_dim)
  int32_t window = 0;  // 0: unlimited
  int32_t sink = 0;    // first `sink` positions stay visible to windowed heads
};

// SegPagedAttention metadata for one layer (FlashInfer-style plan; built on the host when KV is
// written, never per call). Work items are (sequence s, kv head h), item = s * num_kv_heads + h.
// Pages live in one pool shared by every layer and head: token slot j of page p is row
// p * page_size + j of the K, V and position pools. Positions of a head's slots increase along
// its page list; a head sees a key when the AttentionMask rule of that head allows it, so a local
// head's table holds only sink ∪ window pages (plus the slack of partly used pages).
// All tensors are i32 on the backend's device.
struct PagedAttentionPlan {
  int32_t num_seqs = 0;
  int32_t num_kv_heads = 0;
  int32_t page_size = 0;
  float scale = 1.0f;
  Tensor qo_indptr;  // [num_seqs + 1]: query rows of sequence s are [qo_indptr[s], qo_indptr[s+1])
  Tensor kv_indptr;  // [num_seqs * num_kv_heads + 1]: CSR row pointers into page_indices
  Tensor page_indices;  // [nnz]: physical page of each table entry, in position order
  Tensor page_lengths;  // [nnz]: used slots of each page (slots [0, len) are valid)
  Tensor head_window;   // [num_kv_heads]: 0 = global, else the sliding window W
  Tensor head_sink;     // [num_kv_heads]: sink tokens of local heads
};

// Device work recorded once and replayed (CUDA graphs): replay() runs the same kernels on the
// same buffers, with whatever those buffers hold at that time.
class RecordedWork {
 public:
  virtual ~RecordedWork() = default;
  virtual void replay() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  // Activation dtype this backend computes in (F32 on CPU/reference; BF16 on CUDA).
  virtual DType act_dtype() const = 0;

  // ---- memory ----
  // Zero-filled storage on this backend's device.
  virtual Tensor alloc(DType dtype, std::vector<int64_t> shape) = 0;
  // Storage with unspecified contents, for a tensor that ops overwrite in full before anything
  // reads it (GEMM, norm, attention outputs; copy_from_host targets). Skips alloc's fill where
  // that is a cost (CUDA: a memset per allocation). The default is alloc. With
  // REDKNOT_POISON_UNINIT=1 every backend fills it with 0xFF bytes (NaN floats, -1 ints), so a
  // read before the first write shows up in tests.
  virtual Tensor alloc_uninit(DType dtype, std::vector<int64_t> shape);
  // Moves a host weight tensor to this backend, converting to a dtype its GEMM supports
  // (e.g. Q8_0/F16 -> F32 on CPU). May return a view of `host` when no conversion is needed.
  // F8_E4M3 weights stay F8_E4M3 (codes only; their scales travel as f32 tensors): matmul_fp8.
  virtual Tensor upload_weight(const Tensor& host) = 0;
  // Copies a host tensor (any dtype) into `dst` (same dtype and element count) on this device.
  virtual void copy_from_host(Tensor& dst, const Tensor& src) = 0;
  // Returns a host f32 copy (used for logits, tests and debugging).
  virtual Tensor to_host_f32(const Tensor& src) = 0;
  // Waits for queued work (no-op on CPU).
  virtual void synchronize() {}
  // Bytes of device memory still free (host backends: available RAM). Sizes the KV pool from
  // --gpu-memory-fraction.
  virtual int64_t free_memory_bytes() const;

  // ---- ops; all tensors on this device, activations in act_dtype() unless said ----
  // out[t, :] = table[ids[t], :]
  // table: [vocab, hidden] (weight dtype); ids: [T] i32; out: [T, hidden]
  virtual void embedding(const Tensor& table, const Tensor& ids, Tensor& out) = 0;

  // out = x · wᵀ (+ bias)
  // x: [M, K]; w: [N, K] (weight dtype); bias: [N] f32 or empty; out: [M, N]
  virtual void matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) = 0;

  // ---- FP8 (e4m3, core/dtype.h); the defaults throw: backends that support FP8 override ----
  // Dynamic per-row (per-token) quantization: scale[r] = absmax(x[r]) / 448 (0 for an all-zero
  // row), q[r, c] = e4m3(x[r, c] / scale[r]) (f32 division, round-to-nearest-even; 0 when
  // scale[r] == 0). Used for GEMM activations and FP8 KV rows.
  // x: [R, C] act dtype or f32; q: [R, C] f8_e4m3; scale: [R] f32
  virtual void quantize_fp8_rows(const Tensor& x, Tensor& q, Tensor& scale);
  // out[r, c] = e4m3(q[r, c]) * scale[r]. q: [R, C] f8_e4m3; scale: [R] f32; out: [R, C] act/f32
  virtual void dequantize_fp8_rows(const Tensor& q, const Tensor& scale, Tensor& out);
  // FP8 GEMM with per-token activation scales: x is quantized as quantize_fp8_rows does
  // (xq, sx), then out[m, n] = sx[m] * Σ_k xq[m, k] · w[n, k] · ws(n, k) + bias[n], where
  // ws(n, k) = w_scale[n] (per output channel; a per-tensor scale is expanded to [N]) or
  // w_scale[n / 128, k / 128] (128x128 blocks, kFp8Block).
  // x: [M, K] act dtype; w: [N, K] f8_e4m3; w_scale: [N] or [ceil(N/128), ceil(K/128)] f32;
  // bias: [N] f32 or empty; out: [M, N] act dtype or f32
  virtual void matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                          const Tensor& bias, Tensor& out);

  // Row-wise RMSNorm: out[r] = x[r] / rms(x[r]) * weight. out may alias x.
  // x: [R, C]; weight: [C] f32; out: [R, C]
  virtual void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;

  // x += y (residual add). x, y: [R, C]
  virtual void add(Tensor& x, const Tensor& y) = 0;

  // The residual add and the next RMSNorm in one pass: x += y, then out = rmsnorm(x) * weight,
  // with out computed from x as stored (the same values as add then rmsnorm). out must not
  // alias x or y. The default runs the two ops; device backends fuse them.
  // x, y, out: [R, C]; weight: [C] f32
  virtual void add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                           Tensor& out);

  // out = silu(gate) * up. gate, up, out: [R, F]
  virtual void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) = 0;

  // In-place rotary embedding, rotate-half (HF/NeoX) layout: for pair (i, i + D/2) of each head,
  // angle = pos[t] * inv_freq[i], then both outputs are multiplied by `scaling`.
  // With pos = (new - old) and scaling = 1 it is the relocation of cached keys.
  // x: [T, H, D]; pos: [T] i32; inv_freq: [D/2] f32
  virtual void rope(Tensor& x, const Tensor& pos, const Tensor& inv_freq, float scaling) = 0;

  // Masked softmax attention of one sequence over its keys, GQA by head grouping
  // (query head h reads kv head h / (Hq / Hkv)).
  // q: [Tq, Hq, D]; k, v: [Hkv, Tk, D]; q_pos: [Tq] i32; k_pos: [Tk] i32; out: [Tq, Hq, D]
  // k and v may be row slices of a larger cache as long as the head stride is passed:
  // element (h, j, d) is at base + h * kv_head_stride + j * D + d.
  virtual void attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kv_head_stride,
                         const Tensor& q_pos, const Tensor& k_pos, const AttentionMask& mask,
                         Tensor& out) = 0;

  // SegPaged attention: every (sequence, kv head) reads only its own pages (GQA: query head
  // h uses kv head h / (Hq / Hkv)); causal and windowed by positions, no mask tensor.
  // q: [T, Hq, D]; k_pool, v_pool: [pages * page_size, D] in act dtype, or FP8 KV rows
  // [pages * page_size, D + 4] f8_e4m3 (pack_fp8_kv_rows); pos_pool: [pages * page_size] i32;
  // q_pos: [T] i32; out: [T, Hq, D]. The default throws: backends that support it override.
  virtual void paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                               const Tensor& pos_pool, const Tensor& q_pos,
                               const PagedAttentionPlan& plan, Tensor& out);

  // out[r] = ||x[r, :]||₂ (Sparse FFN token importance). x: [R, C]; out: [R] f32.
  // The default works on host memory; device backends override.
  virtual void row_l2norm(const Tensor& x, Tensor& out);

  // ---- FP8 KV rows (--kv-cache-dtype fp8): a row is C e4m3 codes, then the row's f32
  // dequantization scale in bytes [C, C + 4) (kFp8KvScaleBytes). One scale per (token, layer,
  // kv head) row: written once, never rescaled when later tokens arrive, and a relocated key is
  // requantized with a fresh scale of its own, so relocation costs one rounding of the rotated
  // stored key (no shared scale to saturate). Row moves (page copies, the chunk store's tiers)
  // carry the scale with the codes. Defaults work on host memory; device backends override.
  // x: [R, C] act dtype or f32; rows: [R, C + 4] f8_e4m3 (quantized as quantize_fp8_rows)
  virtual void pack_fp8_kv_rows(const Tensor& x, Tensor& rows);
  // rows: [R, C + 4] f8_e4m3; out: [R, C] act dtype or f32
  virtual void unpack_fp8_kv_rows(const Tensor& rows, Tensor& out);

  // ---- data movement (defaults work on host memory; device backends override) ----
  // dst = src, same dtype and element count, both on this device.
  virtual void copy(const Tensor& src, Tensor& dst);
  // dst[rows[i], :] = src[i, :]. Used to write K/V into cache slots and pages.
  // src: [N, C]; rows: [N] i32 (host or device); dst: [R, C], same dtype as src
  virtual void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst);
  // out[i, :] = src[rows[i], :]. Used to gather token subsets (Sparse FFN, forks).
  // src: [R, C]; rows: [N] i32; out: [N, C], same dtype as src
  virtual void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out);

  // Index of the largest value per row (ties: lowest index). logits: [R, V] f32; out: [R] i32
  virtual void argmax(const Tensor& logits, Tensor& out) = 0;

  // ---- recording (decode steps as CUDA graphs) ----
  // Records the device work `body` queues, without running it: replay() runs it. Inside `body`
  // nothing may copy between host and device or wait for the device (the backend throws), and
  // buffers allocated there belong to the recording (kept for its replays). Returns null when
  // this backend cannot record; callers then run `body` directly.
  virtual std::unique_ptr<RecordedWork> record(const std::function<void()>& body);
};

// True when REDKNOT_POISON_UNINIT=1 (read once): alloc_uninit fills with 0xFF bytes.
bool poison_uninit_allocs();

// ---- registry: the only global state in RedKnot ----
using BackendFactory = std::function<std::unique_ptr<Backend>()>;
void register_backend(const std::string& name, BackendFactory factory);
std::vector<std::string> backend_names();
// Throws Error listing the registered names when `name` is unknown.
std::unique_ptr<Backend> create_backend(const std::string& name);

}  // namespace redknot
