#include "model/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "kv/head_profile.h"
#include "model/flops.h"

namespace redknot {

namespace {
std::string layer_name(int64_t l, const std::string& rest) {
  return "model.layers." + std::to_string(l) + "." + rest;
}

// Norm weights stay f32 on every backend: they are small and precision matters.
Tensor to_f32_host(const Tensor& t) {
  if (t.dtype() == DType::F32) return t;
  Tensor out = Tensor::host(DType::F32, t.shape());
  convert_to_f32(t.dtype(), t.raw(), out.data<float>(), t.numel());
  return out;
}
}  // namespace

Tensor Model::upload(const Checkpoint& ckpt, const std::string& name) {
  Tensor t = backend_.upload_weight(ckpt.get(name));
  weight_bytes_ += t.nbytes();
  return t;
}

Linear Model::upload_linear(const Checkpoint& ckpt, const std::string& name) {
  Linear l;
  l.w = upload(ckpt, name);
  if (ckpt.get(name).dtype() == DType::F8_E4M3)
    l.scale = upload_norm(
        ckpt, name.substr(0, name.size() - std::string("weight").size()) + "weight_scale");
  return l;
}

void Model::all_reduce(Tensor& t) {
  if (comm_) comm_->all_reduce_sum(t);
}

void Model::sum_over_ranks(std::vector<float>& v) {
  if (!comm_ || v.empty()) return;
  const int64_t n = static_cast<int64_t>(v.size());
  Tensor t = backend_.alloc_uninit(DType::F32, {n});
  backend_.copy_from_host(t, Tensor::view(v.data(), DType::F32, {n}, nullptr));
  comm_->all_reduce_sum(t);
  const Tensor host = backend_.to_host_f32(t);
  std::copy_n(host.data<float>(), n, v.data());
}

Tensor Model::gather_logits(const Tensor& local) {
  const int64_t R = local.dim(0), Vs = tp_.vocab_slice, V = cfg_.vocab_size, n = tp_.size;
  Tensor all = backend_.alloc_uninit(DType::F32, {n, R, Vs});  // written by the gather
  comm_->all_gather(local, all);
  // Rank q's slice is vocab columns [q * Vs, q * Vs + Vs), padding past V dropped.
  const Tensor host = backend_.to_host_f32(all);
  Tensor full = Tensor::host(DType::F32, {R, V});
  for (int64_t q = 0; q < n; ++q) {
    const int64_t cols = std::min(Vs, V - q * Vs);
    for (int64_t r = 0; cols > 0 && r < R; ++r)
      std::memcpy(full.data<float>() + r * V + q * Vs, host.data<float>() + (q * R + r) * Vs,
                  static_cast<size_t>(cols) * sizeof(float));
  }
  Tensor out = backend_.alloc_uninit(DType::F32, {R, V});
  backend_.copy_from_host(out, full);
  return out;
}

void Model::linear(const Tensor& x, const Linear& w, const Tensor& bias, Tensor& out) {
  if (w.scale.empty())
    backend_.matmul(x, w.w, bias, out);
  else
    backend_.matmul_fp8(x, w.w, w.scale, bias, out);
}

Tensor Model::upload_norm(const Checkpoint& ckpt, const std::string& name) {
  Tensor host = to_f32_host(ckpt.get(name));
  Tensor t = backend_.alloc_uninit(DType::F32, host.shape());  // copy_from_host fills it
  backend_.copy_from_host(t, host);
  weight_bytes_ += t.nbytes();
  return t;
}

Model::Model(const Checkpoint& ckpt, Backend& backend, Communicator* comm)
    : cfg_(ckpt.config),
      tp_(ckpt.tp),
      comm_(ckpt.tp.size > 1 ? comm : nullptr),
      backend_(backend),
      kv_head_perm_(ckpt.kv_head_perm) {
  cfg_.validate(ckpt.path);
  if (tp_.size > 1 && (comm == nullptr || comm->size() != tp_.size || comm->rank() != tp_.rank))
    throw Error(ckpt.path + ": rank " + std::to_string(tp_.rank) + " of " +
                std::to_string(tp_.size) + " needs a communicator of that rank and size");
  const char* graphs = std::getenv("REDKNOT_CUDA_GRAPHS");
  // Recorded decode steps would bake the collectives in: tensor-parallel steps run eagerly.
  graphs_on_ = (graphs == nullptr || std::string(graphs) != "0") && tp_.size == 1;
  embed_ = upload(ckpt, "model.embed_tokens.weight");
  final_norm_ = upload_norm(ckpt, "model.norm.weight");
  if (cfg_.tie_word_embeddings && !ckpt.has("lm_head.weight"))
    lm_head_ = embed_;
  else
    lm_head_ = upload(ckpt, "lm_head.weight");
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    LayerWeights w;
    w.attn_norm = upload_norm(ckpt, layer_name(l, "input_layernorm.weight"));
    w.ffn_norm = upload_norm(ckpt, layer_name(l, "post_attention_layernorm.weight"));
    w.wq = upload_linear(ckpt, layer_name(l, "self_attn.q_proj.weight"));
    w.wk = upload_linear(ckpt, layer_name(l, "self_attn.k_proj.weight"));
    w.wv = upload_linear(ckpt, layer_name(l, "self_attn.v_proj.weight"));
    w.wo = upload_linear(ckpt, layer_name(l, "self_attn.o_proj.weight"));
    if (cfg_.attention_bias) {
      w.bq = upload_norm(ckpt, layer_name(l, "self_attn.q_proj.bias"));
      w.bk = upload_norm(ckpt, layer_name(l, "self_attn.k_proj.bias"));
      w.bv = upload_norm(ckpt, layer_name(l, "self_attn.v_proj.bias"));
    }
    if (cfg_.qk_norm) {
      w.q_norm = upload_norm(ckpt, layer_name(l, "self_attn.q_norm.weight"));
      w.k_norm = upload_norm(ckpt, layer_name(l, "self_attn.k_norm.weight"));
    }
    w.w_gate = upload_linear(ckpt, layer_name(l, "mlp.gate_proj.weight"));
    w.w_up = upload_linear(ckpt, layer_name(l, "mlp.up_proj.weight"));
    w.w_down = upload_linear(ckpt, layer_name(l, "mlp.down_proj.weight"));
    layers_.push_back(std::move(w));
  }
  RopeFreqs rf = rope_frequencies(cfg_);
  rope_scaling_ = rf.attention_scaling;
  inv_freq_ = backend_.alloc_uninit(DType::F32, {static_cast<int64_t>(rf.inv_freq.size())});
  backend_.copy_from_host(
      inv_freq_, Tensor::from_f32(rf.inv_freq, {static_cast<int64_t>(rf.inv_freq.size())}));
}

// x: [T, hidden] (normalised input); pos: [T]; k, v: [T, kv_heads, head_dim] (outputs; k rotated)
void Model::project_kv(int layer, const Tensor& x, const Tensor& pos, Tensor& k, Tensor& v) {
  const LayerWeights& w = layers_[layer];
  const int64_t T = x.dim(0), hd = cfg_.head_dim, nkv = cfg_.num_kv_heads;
  Tensor k2 = k.reshape({T, nkv * hd}), v2 = v.reshape({T, nkv * hd});
  linear(x, w.wk, w.bk, k2);
  linear(x, w.wv, w.bv, v2);
  if (cfg_.qk_norm) {  // Qwen3: RMSNorm over each head's vector before RoPE
    Tensor kr = k.reshape({T * nkv, hd});
    backend_.rmsnorm(kr, w.k_norm, static_cast<float>(cfg_.rms_norm_eps), kr);
  }
  backend_.rope(k, pos, inv_freq_, rope_scaling_);
}

// x: [T, hidden] (normalised input); out: [T, hidden] (o_proj output)
Tensor Model::attention_block(int layer, const Tensor& x, Tensor& out, KvCache& kv,
                              const Tensor& pos, ForwardObserver* observer, StageClock& clock) {
  const LayerWeights& w = layers_[layer];
  const int64_t T = x.dim(0), hd = cfg_.head_dim, nh = cfg_.num_heads, nkv = cfg_.num_kv_heads;
  const DType act = backend_.act_dtype();
  // Every activation below is written in full before it is read (GEMM outputs; rmsnorm and
  // rope work in place on them; attend writes every row of every head): no zero fill.
  Tensor q = backend_.alloc_uninit(act, {T, nh * hd});
  Tensor k3 = backend_.alloc_uninit(act, {T, nkv, hd});
  Tensor v3 = backend_.alloc_uninit(act, {T, nkv, hd});
  linear(x, w.wq, w.bq, q);
  project_kv(layer, x, pos, k3, v3);
  Tensor q3 = q.reshape({T, nh, hd});
  if (cfg_.qk_norm) {
    Tensor qr = q.reshape({T * nh, hd});
    backend_.rmsnorm(qr, w.q_norm, static_cast<float>(cfg_.rms_norm_eps), qr);
  }
  backend_.rope(q3, pos, inv_freq_, rope_scaling_);
  clock.mark("qkv_proj+rope");
  if (observer) observer->on_attention_inputs(layer, q3, k3);
  kv.write(layer, k3, v3);
  clock.mark("kv_write");
  Tensor attn = backend_.alloc_uninit(act, {T, nh, hd});
  kv.attend(layer, q3, attn);
  clock.mark("attention");
  Tensor attn2 = attn.reshape({T, nh * hd});
  linear(attn2, w.wo, Tensor(), out);
  all_reduce(out);  // row-parallel o_proj: each rank holds its heads' share of the sum
  clock.mark("o_proj");
  return attn2;
}

int64_t Model::sparse_ffn_residual(int layer, const Tensor& attn, const Tensor& normed, Tensor& x,
                                   const Batch& batch, const SparseFfnConfig& cfg,
                                   int64_t rows_after, StageClock& clock) {
  const int64_t T = x.dim(0), H = cfg_.hidden_size;
  Tensor norms = backend_.alloc_uninit(DType::F32, {T});
  backend_.row_l2norm(attn, norms);
  Tensor host = backend_.to_host_f32(norms);
  if (comm_) {  // each rank saw its heads only: the norm over all heads is sqrt(sum of squares)
    for (int64_t i = 0; i < T; ++i) host.data<float>()[i] *= host.data<float>()[i];
    backend_.copy_from_host(norms, host);
    all_reduce(norms);
    host = backend_.to_host_f32(norms);
    for (int64_t i = 0; i < T; ++i) host.data<float>()[i] = std::sqrt(host.data<float>()[i]);
  }
  std::vector<float> importance(host.data<float>(), host.data<float>() + T);
  std::vector<int32_t> rows = select_ffn_rows(cfg, layer, importance, batch, rows_after);
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return 0;
  Tensor idx = backend_.alloc_uninit(DType::I32, {R});
  backend_.copy_from_host(idx, Tensor::from_i32(rows, {R}));
  const DType act = backend_.act_dtype();
  // rows are in [0, T), so both gathers write every row; sub_out is a GEMM output.
  Tensor sub_in = backend_.alloc_uninit(act, {R, H}), sub_out = backend_.alloc_uninit(act, {R, H});
  Tensor sub_x = backend_.alloc_uninit(act, {R, H});
  backend_.gather_rows(normed, idx, sub_in);
  clock.mark("sparse_ffn_select");
  ffn_block(layer, sub_in, sub_out);
  clock.mark("ffn");
  backend_.gather_rows(x, idx, sub_x);
  backend_.add(sub_x, sub_out);
  backend_.scatter_rows(sub_x, idx, x);
  clock.mark("sparse_ffn_select");
  return R;
}

// x: [T, hidden] (normalised input); out: [T, hidden] (down_proj output)
void Model::ffn_block(int layer, const Tensor& x, Tensor& out) {
  const LayerWeights& w = layers_[layer];
  const int64_t T = x.dim(0), F = cfg_.intermediate_size;
  Tensor gate = backend_.alloc_uninit(backend_.act_dtype(), {T, F});  // GEMM outputs
  Tensor up = backend_.alloc_uninit(backend_.act_dtype(), {T, F});
  linear(x, w.w_gate, Tensor(), gate);
  linear(x, w.w_up, Tensor(), up);
  backend_.swiglu(gate, up, gate);
  linear(gate, w.w_down, Tensor(), out);
  all_reduce(out);  // row-parallel down_proj
}

void Model::check_kv_only(int from_layer, const HeadProfile* profile) const {
  if (from_layer >= cfg_.num_layers) throw Error("kv_only_from_layer past the last layer");
  // No profile: every head is global.
  const int last = profile ? profile->last_global_layer() : static_cast<int>(cfg_.num_layers) - 1;
  if (last > from_layer)
    throw Error("kv_only_from_layer " + std::to_string(from_layer) + ": layer " +
                std::to_string(last) + " has a global head, whose K/V every later token reads");
}

void Model::account_layer(int layer, const Batch& batch, const HeadProfile& profile,
                          int64_t ffn_rows, bool sparse, FlopsLedger& ledger) const {
  const int64_t T = batch.size();
  ledger.projections += projection_flops_per_token(cfg_) * T;
  (sparse ? ledger.ffn_sparse : ledger.ffn_dense) += ffn_flops_per_token(cfg_) * ffn_rows;
  // By runs of consecutive positions (a prompt chunk is one run).
  for (int64_t t = 0; t < T;) {
    int64_t n = 1;
    while (t + n < T && batch.positions[t + n] == batch.positions[t] + n) ++n;
    attention_flops_span(cfg_, profile, layer, batch.positions[t], n, ledger);
    t += n;
  }
}

namespace {
// Adds the host wall time from construction to stop() (or destruction) to *ms when ms is set.
class HostPlanTimer {
 public:
  explicit HostPlanTimer(double* ms) : ms_(ms), t0_(std::chrono::steady_clock::now()) {}
  ~HostPlanTimer() { stop(); }
  HostPlanTimer(const HostPlanTimer&) = delete;
  HostPlanTimer& operator=(const HostPlanTimer&) = delete;
  void stop() {
    if (!ms_) return;
    *ms_ +=
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
    ms_ = nullptr;
  }

 private:
  double* ms_;
  std::chrono::steady_clock::time_point t0_;
};

// Ends the cache's forward when the step leaves (exceptions too), timing it as host planning.
class EndForward {
 public:
  EndForward(KvCache& kv, double* host_ms) : kv_(kv), host_ms_(host_ms) {}
  ~EndForward() {
    HostPlanTimer t(host_ms_);
    kv_.end_forward();
  }
  EndForward(const EndForward&) = delete;
  EndForward& operator=(const EndForward&) = delete;

 private:
  KvCache& kv_;
  double* host_ms_;
};

bool logits_for_every_row(const Batch& batch) {
  if (batch.size() != static_cast<int64_t>(batch.logit_rows.size())) return false;
  for (size_t i = 0; i < batch.logit_rows.size(); ++i)
    if (batch.logit_rows[i] != static_cast<int64_t>(i)) return false;
  return true;
}
}  // namespace

Tensor Model::forward(const Batch& batch, KvCache& kv, const ForwardOptions& opts) {
  return step(batch, kv, opts, /*greedy=*/false);
}

std::vector<int32_t> Model::forward_greedy(const Batch& batch, KvCache& kv,
                                           const ForwardOptions& opts) {
  const Tensor ids = step(batch, kv, opts, /*greedy=*/true);  // [R] f32 holding token ids
  std::vector<int32_t> out(static_cast<size_t>(ids.numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int32_t>(ids.data<float>()[i]);
  return out;
}

// The argmax of each logits row on the device, as a host f32 tensor (ids < 2^24 are exact).
// logits: [R, vocab] f32 on the backend; out: [R] i32 on the backend (written)
Tensor Model::device_argmax(const Tensor& logits, Tensor& out) {
  backend_.argmax(logits, out);
  return out;
}

Tensor Model::step(const Batch& batch, KvCache& kv, const ForwardOptions& opts, bool greedy) {
  batch.validate(cfg_.vocab_size);
  if (opts.observer && tp_.size > 1 && !opts.observer->combines_ranks())
    throw Error(
        "forward observers (head profiling) see one rank's heads: run them without "
        "tensor parallelism");
  if (const int64_t need = recordable(batch, kv, opts); need > 0)
    return forward_recorded(batch, kv, opts, greedy, need);
  StageClock clock(backend_, opts.stage_times);
  const int64_t T = batch.size();
  // Activations and uploads are written in full before they are read: no zero fill.
  Tensor ids = backend_.alloc_uninit(DType::I32, {T});
  if (tp_.size > 1) {
    // Vocab-parallel embedding: ids outside this rank's slice read its zero row (vocab_slice),
    // so the all-reduce after the lookup leaves each token its one owner's row.
    std::vector<int32_t> local(batch.tokens);
    for (int32_t& id : local)
      id = id >= tp_.vocab0 && id < tp_.vocab0 + tp_.vocab_rows
               ? static_cast<int32_t>(id - tp_.vocab0)
               : static_cast<int32_t>(tp_.vocab_slice);
    backend_.copy_from_host(ids, Tensor::from_i32(local, {T}));
  } else {
    backend_.copy_from_host(ids, Tensor::from_i32(batch.tokens, {T}));
  }
  Tensor pos = backend_.alloc_uninit(DType::I32, {T});
  backend_.copy_from_host(pos, Tensor::from_i32(batch.positions, {T}));

  // Refused before begin_forward, so a bad request leaves the cache as it was.
  HostPlanTimer plan_timer(opts.host_plan_ms);
  if (opts.kv_only_from_layer >= 0) {
    check_kv_only(opts.kv_only_from_layer, kv.head_profile());
    // Deeper layers need not keep these rows at all (their placeholders are never read).
    Batch limited = batch;
    limited.last_stored_layer = opts.kv_only_from_layer;
    kv.begin_forward(limited, pos);
  } else {
    kv.begin_forward(batch, pos);
  }
  plan_timer.stop();
  EndForward end_forward(kv, opts.host_plan_ms);  // the cache stays consistent on exceptions too
  clock.mark("plan");
  Tensor logits = run_layers(batch, kv, ids, pos, opts, clock);
  if (logits.empty()) {
    clock.mark("flops_ledger");
    return greedy ? Tensor::host(DType::F32, {0}) : Tensor::host(DType::F32, {0, cfg_.vocab_size});
  }
  if (greedy) {
    Tensor best = backend_.alloc_uninit(DType::I32, {logits.dim(0)});
    return backend_.to_host_f32(device_argmax(logits, best));
  }
  Tensor host_logits = backend_.to_host_f32(logits);
  clock.mark("lm_head");
  return host_logits;
}

// ids, pos: [T] i32 on the backend; returns the logits of batch.logit_rows on the backend
// ([R, vocab] f32), or an empty tensor when none are computed.
Tensor Model::run_layers(const Batch& batch, KvCache& kv, const Tensor& ids, const Tensor& pos,
                         const ForwardOptions& opts, StageClock& clock) {
  const int64_t T = batch.size(), H = cfg_.hidden_size;
  const DType act = backend_.act_dtype();
  Tensor x = backend_.alloc_uninit(act, {T, H});  // embedding writes every row
  backend_.embedding(embed_, ids, x);
  all_reduce(x);  // vocab-parallel embedding: one rank holds each token's row
  clock.mark("embed");
  // Each layer writes normed (rmsnorm) and block_out (o_proj / down_proj GEMM) before reading.
  Tensor normed = backend_.alloc_uninit(act, {T, H});
  Tensor block_out = backend_.alloc_uninit(act, {T, H});
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const int num_layers = opts.num_layers >= 0
                             ? std::min<int>(opts.num_layers, static_cast<int>(cfg_.num_layers))
                             : static_cast<int>(cfg_.num_layers);
  const HeadProfile* profile = kv.head_profile();
  HeadProfile all_dense;
  if (opts.flops && !profile) {
    all_dense =
        HeadProfile(static_cast<int32_t>(cfg_.num_layers), static_cast<int32_t>(cfg_.num_kv_heads));
    profile = &all_dense;
  }
  const int kv_only = opts.kv_only_from_layer;
  Tensor zero_kv;  // K/V placeholders of the layers past kv_only (local heads only)
  // A dense FFN's output waits in block_out to be added to x by the next norm (fused add +
  // RMSNorm: one pass over x fewer per layer).
  bool pending = false;
  for (int l = 0; l < num_layers; ++l) {
    if (kv_only >= 0 && l >= kv_only) {
      const int64_t nkv = cfg_.num_kv_heads, hd = cfg_.head_dim;
      if (l == kv_only) {
        if (pending)
          backend_.add_rmsnorm(x, block_out, layers_[l].attn_norm, eps, normed);
        else
          backend_.rmsnorm(x, layers_[l].attn_norm, eps, normed);
        pending = false;
        Tensor k3 = backend_.alloc_uninit(act, {T, nkv, hd});
        Tensor v3 = backend_.alloc_uninit(act, {T, nkv, hd});
        project_kv(l, normed, pos, k3, v3);
        clock.mark("qkv_proj+rope");
        kv.write(l, k3, v3);
        clock.mark("kv_write");
        if (opts.flops) opts.flops->projections += kv_projection_flops_per_token(cfg_) * T;
      } else {
        if (zero_kv.numel() == 0) zero_kv = backend_.alloc(act, {T, nkv, hd});  // zero-filled
        kv.write(l, zero_kv, zero_kv);
        clock.mark("kv_write");
      }
      continue;
    }
    if (pending)
      backend_.add_rmsnorm(x, block_out, layers_[l].attn_norm, eps, normed);
    else
      backend_.rmsnorm(x, layers_[l].attn_norm, eps, normed);
    pending = false;
    clock.mark("norm+add");
    Tensor attn = attention_block(l, normed, block_out, kv, pos, opts.observer, clock);
    backend_.add_rmsnorm(x, block_out, layers_[l].ffn_norm, eps, normed);
    clock.mark("norm+add");
    int64_t ffn_rows = T;
    const bool sparse = opts.sparse_ffn && !opts.sparse_ffn->dense(l);
    if (sparse) {
      ffn_rows = sparse_ffn_residual(l, attn, normed, x, batch, *opts.sparse_ffn,
                                     opts.sparse_rows_after, clock);
    } else {
      ffn_block(l, normed, block_out);
      clock.mark("ffn");
      pending = true;
    }
    if (opts.flops) {
      account_layer(l, batch, *profile, ffn_rows, sparse, *opts.flops);
      clock.mark("flops_ledger");
    }
  }

  // Logits only for the rows asked for.
  const int64_t R = static_cast<int64_t>(batch.logit_rows.size());
  if (R == 0 || num_layers < cfg_.num_layers || kv_only >= 0) return Tensor();
  // A tensor-parallel rank computes its vocab slice of the logits.
  const int64_t logit_cols = tp_.size > 1 ? tp_.vocab_slice : cfg_.vocab_size;
  if (opts.flops) opts.flops->lm_head += 2.0 * cfg_.hidden_size * logit_cols * R;
  Tensor last = backend_.alloc_uninit(act, {R, H});  // logit rows are validated in [0, T)
  if (logits_for_every_row(batch)) {                 // decode steps: no row list to upload
    if (pending)
      backend_.add_rmsnorm(x, block_out, final_norm_, eps, last);
    else
      backend_.rmsnorm(x, final_norm_, eps, last);
  } else {
    if (pending) backend_.add(x, block_out);
    std::vector<int32_t> rows(batch.logit_rows.begin(), batch.logit_rows.end());
    Tensor rows_dev = backend_.alloc_uninit(DType::I32, {R});
    backend_.copy_from_host(rows_dev, Tensor::from_i32(rows, {R}));
    backend_.gather_rows(x, rows_dev, last);
    backend_.rmsnorm(last, final_norm_, eps, last);
  }
  Tensor logits = backend_.alloc_uninit(DType::F32, {R, logit_cols});
  backend_.matmul(last, lm_head_, Tensor(), logits);
  return tp_.size > 1 ? gather_logits(logits) : logits;
}

// ---- decode steps as recorded device work ----

// One recorded decode step: `seqs` sequences of one new token each, KV metadata planned into
// `storage` (capacity page entries), token ids and positions read from `ids` and `pos`.
struct Model::DecodeGraph {
  int64_t seqs = 0, capacity = 0;
  std::shared_ptr<PlanStorage> storage;
  Tensor ids, pos;      // [seqs] i32 on the backend: the step's inputs, refilled before each replay
  bool greedy = false;  // the recording ends with the argmax of each row into `best`
  Tensor logits;        // [seqs, vocab] f32 on the backend: written by each replay
  Tensor best;          // [seqs] i32 on the backend (greedy recordings)
  KvCache* kv = nullptr;  // the step's cache (the recorded body's host code reads it)
  std::unique_ptr<RecordedWork> work;
  int64_t last_use = 0;
};

Model::~Model() = default;

void Model::set_decode_graphs(bool on) {
  graphs_on_ = on && tp_.size == 1;
  if (!on) graphs_.clear();
}

int64_t Model::recordable(const Batch& batch, const KvCache& kv, const ForwardOptions& opts) const {
  if (!graphs_on_ || opts.observer || opts.num_layers >= 0 || opts.kv_only_from_layer >= 0 ||
      opts.stage_times || opts.sparse_ffn)
    return -1;
  const int64_t T = batch.size();
  if (T == 0 || T > kMaxRecordedSeqs || !logits_for_every_row(batch)) return -1;
  return kv.plan_capacity(batch);
}

Tensor Model::forward_recorded(const Batch& batch, KvCache& kv, const ForwardOptions& opts,
                               bool greedy, int64_t need) {
  const int64_t T = batch.size();
  // Capacity rounded up to 1/8 of its power of two: sequences growing by a token a step
  // re-record rarely (every ~12% of growth), and the decode kernel, which sizes its split-KV
  // from the capacity, does at most ~12% more splits than the eager step would.
  int64_t pow2 = 64;
  while (pow2 * 2 <= need) pow2 *= 2;
  const int64_t granule = std::max<int64_t>(8, pow2 / 8);
  const int64_t capacity = std::max<int64_t>(64, (need + granule - 1) / granule * granule);
  DecodeGraph* g = nullptr;
  for (auto it = graphs_.begin(); it != graphs_.end();) {
    if (!(*it)->storage || !kv.plan_storage_fits(*(*it)->storage)) {
      it = graphs_.erase(it);  // made for a cache that is gone or changed
      continue;
    }
    if ((*it)->seqs == T && (*it)->capacity == capacity && (*it)->greedy == greedy) g = it->get();
    ++it;
  }
  if (g == nullptr) {
    if (graphs_.size() >= kMaxDecodeGraphs) {  // least recently used goes
      auto oldest = std::min_element(graphs_.begin(), graphs_.end(),
                                     [](auto& a, auto& b) { return a->last_use < b->last_use; });
      graphs_.erase(oldest);
    }
    auto fresh = std::make_unique<DecodeGraph>();
    fresh->seqs = T;
    fresh->capacity = capacity;
    fresh->greedy = greedy;
    fresh->storage = kv.make_plan_storage(static_cast<int32_t>(T), capacity);
    if (!fresh->storage) {
      graphs_on_ = false;
      return step(batch, kv, opts, greedy);
    }
    fresh->ids = backend_.alloc(DType::I32, {T});
    fresh->pos = backend_.alloc(DType::I32, {T});
    if (greedy) fresh->best = backend_.alloc(DType::I32, {T});
    graphs_.push_back(std::move(fresh));
    g = graphs_.back().get();
  }
  g->last_use = ++graph_clock_;
  backend_.copy_from_host(g->ids, Tensor::from_i32(batch.tokens, {T}));
  backend_.copy_from_host(g->pos, Tensor::from_i32(batch.positions, {T}));
  HostPlanTimer plan_timer(opts.host_plan_ms);
  kv.begin_forward(batch, g->pos, *g->storage);
  plan_timer.stop();
  g->kv = &kv;
  EndForward end_forward(kv, opts.host_plan_ms);
  if (!g->work) {
    // Host code runs once, here; replays run only its device work, so the body reads the step's
    // inputs from g's buffers and the plan storage, never from `batch` (copied: same shape).
    g->work = backend_.record([this, g, shape = batch] {
      StageClock none(backend_, nullptr);
      g->logits = run_layers(shape, *g->kv, g->ids, g->pos, ForwardOptions{}, none);
      if (g->greedy) device_argmax(g->logits, g->best);
    });
    if (!g->work) {  // this backend cannot record: this step and the later ones run eagerly
      graphs_on_ = false;
      StageClock none(backend_, nullptr);
      ForwardOptions plain;
      plain.flops = opts.flops;
      const Tensor ids = g->ids, pos = g->pos;
      Tensor best = g->best;
      Tensor logits = run_layers(batch, kv, ids, pos, plain, none);
      graphs_.clear();
      return backend_.to_host_f32(greedy ? device_argmax(logits, best) : logits);
    }
    ++graph_stats_.recorded;
  }
  g->work->replay();
  ++graph_stats_.replayed;
  if (opts.flops) {
    const HeadProfile all_dense(static_cast<int32_t>(cfg_.num_layers),
                                static_cast<int32_t>(cfg_.num_kv_heads));
    const HeadProfile& profile = kv.head_profile() ? *kv.head_profile() : all_dense;
    for (int l = 0; l < cfg_.num_layers; ++l)
      account_layer(l, batch, profile, T, false, *opts.flops);
    opts.flops->lm_head += 2.0 * cfg_.hidden_size * cfg_.vocab_size * T;
  }
  return backend_.to_host_f32(greedy ? g->best : g->logits);
}

}  // namespace redknot
