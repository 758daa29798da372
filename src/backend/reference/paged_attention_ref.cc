#include "backend/reference/paged_attention_ref.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"

namespace redknot {

void check_paged_attention_args(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                                const Tensor& pos_pool, const Tensor& q_pos,
                                const PagedAttentionPlan& plan, const Tensor& out) {
  auto bad = [&](const std::string& what) {
    throw Error("paged_attention: " + what + " (q " + q.describe() + ", k_pool " +
                k_pool.describe() + ")");
  };
  if (q.rank() != 3 || out.shape() != q.shape()) bad("q/out must be [T, Hq, D] and equal");
  const int64_t D = q.dim(2);
  const int64_t row = k_pool.dtype() == DType::F8_E4M3 ? D + kFp8KvScaleBytes : D;
  if (k_pool.rank() != 2 || k_pool.dim(1) != row || v_pool.shape() != k_pool.shape() ||
      v_pool.dtype() != k_pool.dtype())
    bad("pools must be [slots, D] (FP8 KV rows: [slots, D + 4]) of one dtype");
  if (pos_pool.numel() != k_pool.dim(0) || pos_pool.dtype() != DType::I32) bad("pos_pool size");
  if (q_pos.numel() != q.dim(0) || q_pos.dtype() != DType::I32) bad("q_pos must be [T] i32");
  if (plan.num_kv_heads <= 0 || q.dim(1) % plan.num_kv_heads != 0)
    bad("query heads must be a multiple of kv heads");
  if (plan.qo_indptr.numel() != plan.num_seqs + 1 ||
      plan.kv_indptr.numel() != int64_t{plan.num_seqs} * plan.num_kv_heads + 1 ||
      plan.page_lengths.numel() != plan.page_indices.numel() ||
      plan.head_window.numel() != plan.num_kv_heads || plan.head_sink.numel() != plan.num_kv_heads)
    bad("plan arrays have inconsistent sizes");
}

void reference_paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                               const Tensor& pos_pool, const Tensor& q_pos,
                               const PagedAttentionPlan& plan, Tensor& out) {
  check_paged_attention_args(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
  const bool fp8 = k_pool.dtype() == DType::F8_E4M3;
  if (q.dtype() != DType::F32 || (k_pool.dtype() != DType::F32 && !fp8) ||
      out.dtype() != DType::F32)
    throw Error("reference paged_attention: f32 (or FP8 KV rows) only");
  const int64_t Hq = q.dim(1), D = q.dim(2), Hkv = plan.num_kv_heads, group = Hq / Hkv;
  const int64_t ps = plan.page_size;
  const int32_t* qo = plan.qo_indptr.data<int32_t>();
  const int32_t* kv = plan.kv_indptr.data<int32_t>();
  const int32_t* pages = plan.page_indices.data<int32_t>();
  const int32_t* lens = plan.page_lengths.data<int32_t>();
  const int32_t* win = plan.head_window.data<int32_t>();
  const int32_t* sink = plan.head_sink.data<int32_t>();
  const int32_t* kpos = pos_pool.data<int32_t>();
  const int32_t* qp = q_pos.data<int32_t>();
  // Element d of pool row r, dequantized for FP8 KV rows (codes, then the row's f32 scale).
  const int64_t width = k_pool.dim(1);
  auto element = [&](const Tensor& pool, int64_t r, int64_t d) -> double {
    if (!fp8) return pool.data<float>()[r * D + d];
    const uint8_t* row = pool.data<uint8_t>() + r * width;
    float scale;
    std::memcpy(&scale, row + D, sizeof(scale));
    return double(fp8_e4m3_to_f32(row[d])) * scale;
  };
  std::vector<double> scores, acc(D);
  std::vector<int64_t> rows;
  for (int32_t s = 0; s < plan.num_seqs; ++s)
    for (int64_t t = qo[s]; t < qo[s + 1]; ++t)
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const int64_t h = hq / group;
        const float* qv = q.data<float>() + (t * Hq + hq) * D;
        float* o = out.data<float>() + (t * Hq + hq) * D;
        scores.clear();
        rows.clear();
        const int64_t item = int64_t{s} * Hkv + h;
        for (int32_t e = kv[item]; e < kv[item + 1]; ++e)
          for (int32_t j = 0; j < lens[e]; ++j) {
            const int64_t row = int64_t{pages[e]} * ps + j;
            const int32_t p = kpos[row];
            const bool visible = p <= qp[t] && (win[h] == 0 || qp[t] - p < win[h] || p < sink[h]);
            if (!visible) continue;
            double dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += double(qv[d]) * element(k_pool, row, d);
            scores.push_back(dot * plan.scale);
            rows.push_back(row);
          }
        std::fill(acc.begin(), acc.end(), 0.0);
        if (!scores.empty()) {
          double mx = scores[0];
          for (double x : scores) mx = std::max(mx, x);
          double sum = 0;
          for (double& x : scores) sum += (x = std::exp(x - mx));
          for (size_t i = 0; i < rows.size(); ++i)
            for (int64_t d = 0; d < D; ++d) acc[d] += scores[i] / sum * element(v_pool, rows[i], d);
        }
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(acc[d]);
      }
}

}  // namespace redknot
