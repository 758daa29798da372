// The decoder of the Llama family (Llama, Mistral, Qwen2, Qwen3): one dataflow over named
// blocks, with the architecture differences carried by the config (q/k/v biases, q/k norm,
// head_dim, sliding window, tied embeddings, rope scaling).
#pragma once
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/communicator.h"
#include "core/batch.h"
#include "core/model_config.h"
#include "kv/kv_cache.h"
#include "loader/checkpoint.h"
#include "model/sparse_ffn.h"
#include "model/stage_times.h"

namespace redknot {

// A linear projection's weight on the backend: float (scale empty: matmul) or FP8 codes with
// their scales (matmul_fp8; loader/fp8_checkpoint.h).
struct Linear {
  Tensor w;      // [N, K]
  Tensor scale;  // FP8: [N] or [ceil(N/128), ceil(K/128)] f32; empty otherwise
};

struct LayerWeights {
  Tensor attn_norm;             // [hidden]
  Linear wq, wk, wv, wo;        // [heads*hd, hidden], [kv*hd, hidden] x2, [hidden, heads*hd]
  Tensor bq, bk, bv;            // [heads*hd], [kv*hd] x2 (Qwen2) or empty
  Tensor q_norm, k_norm;        // [head_dim] (Qwen3) or empty
  Tensor ffn_norm;              // [hidden]
  Linear w_gate, w_up, w_down;  // [ffn, hidden] x2, [hidden, ffn]
};

// Sees every layer's queries and keys after RoPE (the head profiler reads attention maps here).
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  // q: [T, heads, head_dim]; k: [T, kv_heads, head_dim] (on the backend device)
  virtual void on_attention_inputs(int layer, const Tensor& q, const Tensor& k) = 0;
  // Tensor parallel: q and k hold this rank's heads only. An observer that combines the ranks'
  // results itself (CacheBlend's key deviation, summed with Model::sum_over_ranks) says so;
  // the others (head profiling) are refused there.
  virtual bool combines_ranks() const { return false; }
};

struct FlopsLedger;
class HeadProfile;

// Per-call switches of a forward pass (all off: the plain dense forward).
struct ForwardOptions {
  ForwardObserver* observer = nullptr;
  int num_layers = -1;  // >= 0: stop after that many layers (no logits)
  const SparseFfnConfig* sparse_ffn = nullptr;
  int64_t sparse_rows_after = 0;  // rows of the same pass after this forward (select_ffn_rows)
  FlopsLedger* flops = nullptr;   // accumulates what this forward computed
  // >= 0: no later token reads these rows' outputs, only their K/V (dead-row skipping in reuse):
  // this layer computes K/V alone (no queries, attention, o_proj or FFN) and the deeper layers,
  // which must hold only local heads, store zero K/V placeholders. The caller keeps every later
  // query far enough away that no local window reaches a placeholder it needs. No logits.
  int kv_only_from_layer = -1;
  StageTimes* stage_times = nullptr;  // profiling: wall time per stage (synchronises each stage)
  // Adds the host time of the step's KV planning (the cache's begin_forward with its uploads
  // queued, and end_forward), without a device sync: recorded decode steps stay recorded.
  double* host_plan_ms = nullptr;
};

class Model {
 public:
  // Uploads the checkpoint's weights to `backend` (which must outlive the model). A rank's
  // checkpoint (loader/shard_checkpoint.h, ckpt.tp.size > 1) makes one rank of a tensor-parallel
  // model: it needs `comm` (rank and size as the shard's), and every rank must call forward
  // with the same batch at the same time (each on its own KV cache holding its own heads).
  Model(const Checkpoint& ckpt, Backend& backend, Communicator* comm = nullptr);

  // This rank's config: its own query/kv heads and FFN columns; vocab_size is the model's.
  const ModelConfig& config() const { return cfg_; }
  // The unsharded model's config (config() when not tensor-parallel).
  const ModelConfig& global_config() const { return tp_.size > 1 ? tp_.global : cfg_; }
  const TpShard& tp() const { return tp_; }
  // Tensor parallel: every rank's `v` becomes the elementwise sum of all ranks' (the same bits on
  // every rank), for host decisions the ranks must make alike from their own heads' data. No-op
  // at one rank. Every rank must call it at the same point with the same size.
  void sum_over_ranks(std::vector<float>& v);
  Backend& backend() const { return backend_; }
  // [head_dim / 2] f32 on the backend: the scaled inverse rotary frequencies.
  const Tensor& inv_freq() const { return inv_freq_; }

  // Runs `batch` through every layer, appending its K/V to `kv`, and returns the logits of
  // batch.logit_rows as a host f32 tensor [logit_rows, vocab]. Throws OutOfKvMemory (KV
  // unchanged) when the cache cannot take the batch, Error on invalid tokens/positions.
  Tensor forward(const Batch& batch, KvCache& kv, const ForwardOptions& opts);
  // The same forward with the argmax of each logit row taken on the device (greedy decoding):
  // only the token ids, one per batch.logit_rows entry, come back to the host.
  std::vector<int32_t> forward_greedy(const Batch& batch, KvCache& kv,
                                      const ForwardOptions& opts = {});
  Tensor forward(const Batch& batch, KvCache& kv, ForwardObserver* observer = nullptr) {
    ForwardOptions o;
    o.observer = observer;
    return forward(batch, kv, o);
  }

  // The checkpoint's kv head order (Checkpoint::kv_head_perm): [layer][position] -> the file's
  // head; empty: file order. A head profile must carry the same placement.
  const std::vector<std::vector<int32_t>>& kv_head_perm() const { return kv_head_perm_; }

  // Size in bytes of the weights as stored on the backend.
  int64_t weight_bytes() const { return weight_bytes_; }

  // Decode steps (one new token per sequence, logits for each) run as recorded device work
  // (CUDA graphs: one launch instead of ~15 per layer) where the backend can record and the KV
  // store can plan into fixed storage. On by default unless REDKNOT_CUDA_GRAPHS=0; one recording
  // per (sequences, metadata capacity), the least recently used of kMaxDecodeGraphs dropped.
  void set_decode_graphs(bool on);
  struct DecodeGraphStats {
    int64_t recorded = 0, replayed = 0;
  };
  DecodeGraphStats decode_graph_stats() const { return graph_stats_; }
  static constexpr int64_t kMaxRecordedSeqs = 256;
  static constexpr size_t kMaxDecodeGraphs = 16;

  ~Model();

 private:
  struct DecodeGraph;
  // The layers from the embedding to the logits of batch.logit_rows ([R, vocab] f32 on the
  // backend; empty when none are computed). ids, pos: [T] i32 on the backend.
  Tensor run_layers(const Batch& batch, KvCache& kv, const Tensor& ids, const Tensor& pos,
                    const ForwardOptions& opts, StageClock& clock);
  // forward / forward_greedy: host logits [R, vocab], or (greedy) the row argmaxes as [R] f32.
  Tensor step(const Batch& batch, KvCache& kv, const ForwardOptions& opts, bool greedy);
  Tensor device_argmax(const Tensor& logits, Tensor& out);
  // The plan capacity a recorded step of `batch` needs, or <= 0 when it cannot be recorded.
  int64_t recordable(const Batch& batch, const KvCache& kv, const ForwardOptions& opts) const;
  Tensor forward_recorded(const Batch& batch, KvCache& kv, const ForwardOptions& opts, bool greedy,
                          int64_t need);
  // FLOPs of one layer over `batch` (ffn_rows rows through the FFN).
  void account_layer(int layer, const Batch& batch, const HeadProfile& profile, int64_t ffn_rows,
                     bool sparse, FlopsLedger& ledger) const;
  // Returns the attention output before o_proj ([T, heads*hd]) for Sparse FFN importance.
  Tensor attention_block(int layer, const Tensor& x, Tensor& out, KvCache& kv, const Tensor& pos,
                         ForwardObserver* observer, StageClock& clock);
  void ffn_block(int layer, const Tensor& x, Tensor& out);
  // x: [T, hidden] (normalised input); pos: [T]; k, v: [T, kv_heads, head_dim] (k rotated)
  void project_kv(int layer, const Tensor& x, const Tensor& pos, Tensor& k, Tensor& v);
  // Throws unless every layer after from_layer holds only local heads.
  void check_kv_only(int from_layer, const HeadProfile* profile) const;
  // Sparse FFN: runs the FFN on the selected rows of `normed` and adds it to those rows of x.
  // Returns the number of rows that ran. attn: [T, heads*hd] (importance source)
  int64_t sparse_ffn_residual(int layer, const Tensor& attn, const Tensor& normed, Tensor& x,
                              const Batch& batch, const SparseFfnConfig& cfg, int64_t rows_after,
                              StageClock& clock);
  Tensor upload(const Checkpoint& ckpt, const std::string& name);
  // A linear projection's weight, with its "<proj>.weight_scale" when the weight is FP8.
  Linear upload_linear(const Checkpoint& ckpt, const std::string& name);
  // out = x · wᵀ (+ bias) through matmul or matmul_fp8. x: [M, K]; bias: [N] or empty; out: [M, N]
  void linear(const Tensor& x, const Linear& w, const Tensor& bias, Tensor& out);
  Tensor upload_norm(const Checkpoint& ckpt, const std::string& name);
  // Tensor parallelism: sums a row-parallel partial result over the ranks (no-op at one rank).
  // t: [T, hidden] act dtype on the backend
  void all_reduce(Tensor& t);
  // The full logits from every rank's vocab slice. local: [R, vocab_slice] f32 on the backend;
  // returns [R, vocab] f32 on the backend.
  Tensor gather_logits(const Tensor& local);

  ModelConfig cfg_;
  TpShard tp_;
  Communicator* comm_ = nullptr;
  Backend& backend_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  Tensor inv_freq_;
  float rope_scaling_ = 1.0f;
  int64_t weight_bytes_ = 0;
  std::vector<std::vector<int32_t>> kv_head_perm_;
  bool graphs_on_ = true;
  std::vector<std::unique_ptr<DecodeGraph>> graphs_;
  int64_t graph_clock_ = 0;
  DecodeGraphStats graph_stats_;
};

}  // namespace redknot
