// Tensor-core SegPaged attention (FlashAttention-2 style) for bf16, head_dim 32, 64 or 128.
//
// One block serves one (sequence, kv head) and a tile of kRows = 16 * kWarps query rows, where
// the rows of a sequence are its (token, GQA query head) pairs: row r is token r / group, query
// head h * group + r % group, so the K/V tiles are read once for the whole group. The block
// walks its head's page list from the CSR plan in tiles of kKeys = 64 key slots (a tile may
// span several pages, ragged pages included), gathering each slot's K and V row with cp.async
// into shared memory, two stages deep. Pages that no row of the tile can see (first position
// beyond the tile's last query; a local head's pages wholly outside sink ∪ window) are skipped
// from the position pool alone, without reading their K/V. S = Q·Kᵀ and O += P·V run on
// mma.sync m16n8k16 (bf16 in, f32 accumulate); the softmax is online, in registers.
//
// Split-KV (flash decoding): with gridDim.z = splits > 1 the head's page list is cut into
// `splits` equal runs of entries; each block writes its unnormalised O, row max m and row sum l
// (f32) to a workspace and paged_flash_merge_kernel combines them. Decode uses kWarps = 1
// (16 rows: one token's group of query heads, or a few tokens), prefill kWarps = 4.
#pragma once
#include <cuda_bf16.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "backend/cuda/ptx.cuh"

namespace redknot::cuda {

struct FlashParams {
  int32_t hq, hkv, group, page_size, num_seqs, splits;
  int64_t total_rows;  // T (tokens of the whole batch)
  float scale_log2;    // softmax scale * log2(e)
};

inline constexpr int kFlashKeys = 64;

// Which (sequence, row tile) block x serves, by a warp-wide scan of the sequences' tile counts
// (kRows = `rows` query rows per tile). Reversed so that the last tiles of a sequence (the most
// keys under causality) start first. Called by one whole warp; lane 0 writes out[0] = sequence
// (-1 past the last tile) and out[1] = tile.
__device__ __forceinline__ void find_row_tile(const int32_t* __restrict__ qo_indptr,
                                              int32_t num_seqs, int group, int rows, int lane,
                                              int32_t* out) {
  int32_t remaining = gridDim.x - 1 - blockIdx.x, seq = -1, tile = 0;
  for (int32_t s0 = 0; s0 < num_seqs; s0 += 32) {
    const int32_t s = s0 + lane;
    int32_t tiles = 0;
    if (s < num_seqs) tiles = ((qo_indptr[s + 1] - qo_indptr[s]) * group + rows - 1) / rows;
    int32_t incl = tiles;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const int32_t excl = incl - tiles;
    const unsigned hit = __ballot_sync(0xffffffffu, remaining >= excl && remaining < incl);
    if (hit != 0) {
      const int src = __ffs(hit) - 1;
      seq = s0 + src;
      tile = remaining - __shfl_sync(0xffffffffu, excl, src);
      break;
    }
    remaining -= __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) {
    out[0] = seq;
    out[1] = tile;
  }
}

// Warp 0's walk over one block's run of a (sequence, kv head)'s page entries (split `split` of
// p.splits equal runs), listing the slots of the next key tile. Lane i caches entry w_base + i
// (length, page, first and last position), refreshed every 32 entries, so listing a tile costs
// no global latency. Pages no row of the tile can see are skipped from positions alone: those
// starting past the tile's last query (positions increase along the list), and a local head's
// pages wholly outside sink ∪ window.
struct PageCursor {
  const int32_t* __restrict__ page_indices;
  const int32_t* __restrict__ page_lengths;
  const int32_t* __restrict__ pos_pool;
  int32_t page_size, e, e_end, off = 0;
  int32_t w_base = INT_MIN / 2, m_len = 0, m_page = 0, m_first = 0, m_last = 0;

  __device__ PageCursor(const int32_t* indices, const int32_t* lengths, const int32_t* pos,
                        const FlashParams& p, int32_t seq, int h, int split,
                        const int32_t* __restrict__ kv_indptr)
      : page_indices(indices), page_lengths(lengths), pos_pool(pos), page_size(p.page_size) {
    const int64_t item = int64_t{seq} * p.hkv + h;
    const int32_t ea = kv_indptr[item], eb = kv_indptr[item + 1];
    const int32_t per = (eb - ea + p.splits - 1) / p.splits;
    e = min(eb, ea + split * per);
    e_end = min(eb, e + per);
  }

  __device__ void refresh(int32_t at, int lane) {
    w_base = at;
    const int32_t ee = at + lane;
    m_len = 0;
    if (ee < e_end) {
      m_len = page_lengths[ee];
      m_page = page_indices[ee];
      if (m_len > 0) {
        const int64_t base = static_cast<int64_t>(m_page) * page_size;
        m_first = pos_pool[base];
        m_last = pos_pool[base + m_len - 1];
      }
    }
  }

  // Lists up to kKeys slots into slot_s (unused ones -1, their kpos_s INT_MAX: never visible);
  // lane 0 writes *count and *all_visible (every real row of the tile sees every slot, from
  // whole-page position bounds: conservative, never wrong). q_lo, q_hi: the tile's query
  // position range.
  template <int kKeys>
  __device__ void fill(int32_t* slot_s, int32_t* kpos_s, int32_t* count, int32_t* all_visible,
                       int lane, int32_t q_lo, int32_t q_hi, int32_t window, int32_t sink) {
    const int64_t window_lo = static_cast<int64_t>(q_lo) - window + 1;
    int32_t n = 0, k_first = INT_MAX, k_last = INT_MIN;
    while (n < kKeys && e < e_end) {
      if (e - w_base >= 32) refresh(e, lane);
      const int src = e - w_base;
      const int32_t len = __shfl_sync(0xffffffffu, m_len, src);
      const int32_t page = __shfl_sync(0xffffffffu, m_page, src);
      const int32_t first = __shfl_sync(0xffffffffu, m_first, src);
      const int32_t last = __shfl_sync(0xffffffffu, m_last, src);
      if (len <= 0) {
        ++e;
        off = 0;
        continue;
      }
      if (off == 0) {
        if (first > q_hi) {  // positions increase along the list: nothing later is visible
          e = e_end;
          break;
        }
        if (window > 0 && first >= sink && last < window_lo) {
          ++e;
          continue;
        }
      }
      const int64_t base = static_cast<int64_t>(page) * page_size;
      const int32_t take = min(len - off, kKeys - n);
      for (int i = lane; i < take; i += 32) slot_s[n + i] = static_cast<int32_t>(base + off + i);
      k_first = min(k_first, first);
      k_last = max(k_last, last);
      n += take;
      off += take;
      if (off == len) {
        ++e;
        off = 0;
      }
    }
    for (int i = n + lane; i < kKeys; i += 32) {
      slot_s[i] = -1;
      kpos_s[i] = INT_MAX;
    }
    if (lane == 0) {
      *count = n;
      *all_visible = n == kKeys && k_last <= q_lo &&
                     (window == 0 || static_cast<int64_t>(q_hi) - k_first < window);
    }
  }
};

// Query position range [lo, hi] of the rows [r0, r0 + rows) of a sequence (seq_rows rows in
// all, token = row / group), reduced over warp 0 (every lane gets it).
__device__ __forceinline__ void tile_query_range(const int32_t* __restrict__ q_pos, int32_t tok0,
                                                 int32_t r0, int rows, int32_t seq_rows, int group,
                                                 int lane, int32_t& q_lo, int32_t& q_hi) {
  q_lo = INT_MAX;
  q_hi = INT_MIN;
  const int32_t t_first = r0 / group;
  const int32_t t_last = (min(r0 + rows, seq_rows) - 1) / group;
  for (int32_t t = t_first + lane; t <= t_last; t += 32) {
    const int32_t v = q_pos[tok0 + t];
    q_lo = min(q_lo, v);
    q_hi = max(q_hi, v);
  }
  for (int o = 16; o > 0; o >>= 1) {
    q_lo = min(q_lo, __shfl_xor_sync(0xffffffffu, q_lo, o));
    q_hi = max(q_hi, __shfl_xor_sync(0xffffffffu, q_hi, o));
  }
}

// ---- per-warp tile math of the wgmma kernel (paged_flash_sm90.cuh) ----
// The mma.sync kernel below keeps its own inline copy of the same math: routed through these
// helpers it measured 14% slower on the H200 (prefill 225 -> 194 TFLOP/s, decode 0.64 -> 0.73 ms),
// for reasons not found in its PTX, so its benchmarked code stays as it is.
// Accumulator layout (mma.sync m16n8 C fragment, and wgmma's per warp): a warp holds 16 rows;
// element 4j + c of a thread's array is row lane/4 (+8 when c >= 2), column 8j + 2(lane%4) +
// (c & 1). Scores stay raw (unscaled) until the exponent, which folds in scale * log2(e).

// Masks scores that a row may not see: key position after the query, or (local heads) outside
// sink ∪ window. kpos: [kKeys] positions of the tile's slots (INT_MAX: empty slot).
template <int kKeys>
__device__ __forceinline__ void mask_scores(float (&s)[kKeys / 2], const int32_t* kpos,
                                            const int32_t (&qp)[2], int32_t window, int32_t sink,
                                            int lane) {
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int32_t kp = kpos[j * 8 + 2 * (lane % 4) + (c & 1)];
      const int32_t qq = qp[c >> 1];
      const bool vis =
          kp <= qq && (window == 0 || static_cast<int64_t>(qq) - kp < window || kp < sink);
      if (!vis) s[4 * j + c] = -INFINITY;
    }
}

// Online softmax of one tile for the thread's two rows (the 4 lanes of a quad share a row):
// turns the raw scores into P = 2^(s * scale_log2 - m), updates the running max m (log2
// units) and the quad-partial running sum l, and returns O's correction factors.
template <int kKeys>
__device__ __forceinline__ void online_softmax(float (&s)[kKeys / 2], float (&m_run)[2],
                                               float (&l_run)[2], float scale_log2,
                                               float (&corr)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
      mx = fmaxf(mx, fmaxf(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run[i], mx * scale_log2);  // the scale is positive
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    corr[i] = exp2f(m_run[i] - m_use);
    m_run[i] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
      const float p0 = exp2f(fmaf(s[4 * j + 2 * i], scale_log2, -m_use));
      const float p1 = exp2f(fmaf(s[4 * j + 2 * i + 1], scale_log2, -m_use));
      s[4 * j + 2 * i] = p0;
      s[4 * j + 2 * i + 1] = p1;
      sum += p0 + p1;
    }
    l_run[i] = l_run[i] * corr[i] + sum;
  }
}

template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 2], const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[4 * j] *= corr[0];
    o[4 * j + 1] *= corr[0];
    o[4 * j + 2] *= corr[1];
    o[4 * j + 3] *= corr[1];
  }
}

// P's bf16 A fragment (m16n8k16 / wgmma register A) for keys [16 kk, 16 kk + 16).
template <int kKeys>
__device__ __forceinline__ void p_fragment(const float (&s)[kKeys / 2], int kk, uint32_t (&a)[4]) {
  a[0] = pack_bf16(s[8 * kk], s[8 * kk + 1]);
  a[1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
  a[2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
  a[3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
}

// Epilogue: the thread's two rows row0 and row0 + 8 of the sequence (rows past seq_rows are
// padding) as bf16 out (one split) or as unnormalised O, m and l into the split-KV workspace.
// out: [T, Hq, D]; part_o: [splits, T * Hq, D]; part_ml: [splits, T * Hq, 2]
template <int D>
__device__ __forceinline__ void store_rows(const float (&o)[D / 2], const float (&m_run)[2],
                                           float (&l_run)[2], const FlashParams& p, int32_t tok0,
                                           int32_t row0, int32_t seq_rows, int h, int split,
                                           int lane, __nv_bfloat16* __restrict__ out,
                                           float* __restrict__ part_o,
                                           float* __restrict__ part_ml) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int32_t row = row0 + 8 * i;
    if (row >= seq_rows) continue;
    const int64_t t = tok0 + row / p.group;
    const int64_t head = int64_t{h} * p.group + row % p.group;
    const int64_t orow = t * p.hq + head;
    if (p.splits == 1) {
      const float inv_l = l_run[i] > 0.0f ? 1.0f / l_run[i] : 0.0f;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + 2 * (lane % 4);
        *reinterpret_cast<__nv_bfloat162*>(out + orow * D + col) =
            __floats2bfloat162_rn(o[4 * j + 2 * i] * inv_l, o[4 * j + 2 * i + 1] * inv_l);
      }
    } else {
      const int64_t prow = int64_t{split} * p.total_rows * p.hq + orow;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(part_o + prow * D + col) =
            make_float2(o[4 * j + 2 * i], o[4 * j + 2 * i + 1]);
      }
      if (lane % 4 == 0) {
        part_ml[prow * 2] = m_run[i];
        part_ml[prow * 2 + 1] = l_run[i];
      }
    }
  }
}

template <int D, int kWarps>
struct FlashSmem {
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kStride = D + 8;  // bf16 elements per smem row (16 B pad: no conflicts)
  static constexpr size_t kQ = size_t{kRows} * kStride * 2;
  static constexpr size_t kKV = size_t{kFlashKeys} * kStride * 2;
  static constexpr size_t kBytes = kQ + 4 * kKV + 2 * kFlashKeys * 4 * 2 + 64;
};

template <int D, int kWarps>
__global__ void __launch_bounds__(32 * kWarps) paged_flash_kernel(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const int32_t* __restrict__ pos_pool,
    const int32_t* __restrict__ q_pos, const int32_t* __restrict__ qo_indptr,
    const int32_t* __restrict__ kv_indptr, const int32_t* __restrict__ page_indices,
    const int32_t* __restrict__ page_lengths, const int32_t* __restrict__ head_window,
    const int32_t* __restrict__ head_sink, FlashParams p, __nv_bfloat16* __restrict__ out,
    float* __restrict__ part_o, float* __restrict__ part_ml) {
  // Q·Kᵀ walks D in k-steps of 16 and P·V covers it in pairs of 8-wide n-tiles (one
  // ldmatrix_x4 each): D = 32 is 2 k-steps and 4 n-tiles.
  static_assert(D % 16 == 0, "paged_flash_kernel: head_dim must be a multiple of 16");
  using S = FlashSmem<D, kWarps>;
  constexpr int kRows = S::kRows, kStride = S::kStride, kThreads = 32 * kWarps;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem_raw + S::kQ);
  __nv_bfloat16* v_s = reinterpret_cast<__nv_bfloat16*>(smem_raw + S::kQ + 2 * S::kKV);
  int32_t* slot_s = reinterpret_cast<int32_t*>(smem_raw + S::kQ + 4 * S::kKV);  // [2][kKeys]
  int32_t* kpos_s = slot_s + 2 * kFlashKeys;                                    // [2][kKeys]
  int32_t* meta_s = kpos_s + 2 * kFlashKeys;  // [0..1] count, [2..3] fully visible, [4..8] tile

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int h = blockIdx.y, split = blockIdx.z;
  const int group = p.group;

  // ---- which sequence and row tile ----
  if (warp == 0) find_row_tile(qo_indptr, p.num_seqs, group, kRows, lane, meta_s + 4);
  __syncthreads();
  const int32_t seq = meta_s[4];
  if (seq < 0) return;
  const int32_t tile = meta_s[5];
  const int32_t tok0 = qo_indptr[seq];
  const int32_t seq_rows = (qo_indptr[seq + 1] - tok0) * group;
  const int32_t r0 = tile * kRows;
  const int32_t window = head_window[h], sink = head_sink[h];

  // ---- Q tile into smem (zero rows past the sequence) ----
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int32_t row = r0 + r;
    const bool valid = row < seq_rows;
    const int64_t t = tok0 + (valid ? row / group : 0);
    const int64_t head = int64_t{h} * group + (valid ? row % group : 0);
    cp_async16(q_s + r * kStride + c * 8, q + (t * p.hq + head) * D + c * 8, valid ? 16 : 0);
  }
  cp_async_commit();

  // Query positions of this thread's two rows (-1: padding row, sees nothing).
  int32_t qp[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int32_t row = r0 + warp * 16 + lane / 4 + 8 * i;
    qp[i] = row < seq_rows ? q_pos[tok0 + row / group] : -1;
  }
  // Tile-wide query position range (for page skipping), by warp 0.
  int32_t q_lo = INT_MAX, q_hi = INT_MIN;
  if (warp == 0) tile_query_range(q_pos, tok0, r0, kRows, seq_rows, group, lane, q_lo, q_hi);
  // ---- this block's run of page entries ----
  PageCursor cur_pages(page_indices, page_lengths, pos_pool, p, seq, h, split, kv_indptr);
  auto fill = [&](int b) {
    cur_pages.fill<kFlashKeys>(slot_s + b * kFlashKeys, kpos_s + b * kFlashKeys, meta_s + b,
                               meta_s + 2 + b, lane, q_lo, q_hi, window, sink);
  };
  // K, V rows and the slots' positions of buffer b, asynchronously.
  auto load = [&](int b) {
    for (int i = tid; i < kFlashKeys * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int32_t slot = slot_s[b * kFlashKeys + r];
      const int64_t src = (slot >= 0 ? int64_t{slot} : 0) * D + c * 8;
      const int bytes = slot >= 0 ? 16 : 0;
      cp_async16(k_s + (b * kFlashKeys + r) * kStride + c * 8, k_pool + src, bytes);
      cp_async16(v_s + (b * kFlashKeys + r) * kStride + c * 8, v_pool + src, bytes);
    }
    for (int r = tid; r < kFlashKeys; r += kThreads) {
      const int32_t slot = slot_s[b * kFlashKeys + r];
      if (slot >= 0) cp_async4(kpos_s + b * kFlashKeys + r, pos_pool + slot);
    }
  };

  if (warp == 0) fill(0);
  __syncthreads();
  load(0);
  cp_async_commit();

  // Accumulators: O [16 rows x D] per warp as D/8 n-tiles; running max and sum for 2 rows.
  float o_acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) o_acc[j][c] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  uint32_t q_frag[D / 16][4];
  bool q_loaded = false;

  for (int it = 0;; ++it) {
    const int cur = it & 1, nxt = cur ^ 1;
    if (meta_s[cur] == 0) break;  // uniform: read after a barrier
    if (warp == 0) fill(nxt);
    __syncthreads();
    load(nxt);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (!q_loaded) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const __nv_bfloat16* ptr =
            q_s + (warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(q_frag[kk][0], q_frag[kk][1], q_frag[kk][2], q_frag[kk][3], ptr);
      }
      q_loaded = true;
    }
    const __nv_bfloat16* kb = k_s + cur * kFlashKeys * kStride;
    const __nv_bfloat16* vb = v_s + cur * kFlashKeys * kStride;

    // S = Q Kᵀ: 16 rows x 64 keys per warp (8 n-tiles).
    float s_acc[kFlashKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kFlashKeys / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) s_acc[j][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int jp = 0; jp < kFlashKeys / 16; ++jp) {
        uint32_t b0, b1, b2, b3;
        const __nv_bfloat16* ptr =
            kb + (jp * 16 + (lane / 16) * 8 + lane % 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(b0, b1, b2, b3, ptr);
        mma_bf16(s_acc[2 * jp], q_frag[kk], b0, b1);
        mma_bf16(s_acc[2 * jp + 1], q_frag[kk], b2, b3);
      }
    }
    // Scale to log2 units; mask by positions unless the whole tile is visible.
    const bool all_visible = meta_s[2 + cur] != 0;
#pragma unroll
    for (int j = 0; j < kFlashKeys / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v = s_acc[j][c] * p.scale_log2;
        if (!all_visible) {
          const int col = j * 8 + 2 * (lane % 4) + (c & 1);
          const int32_t kp = kpos_s[cur * kFlashKeys + col];
          const int32_t qq = qp[c >> 1];
          const bool vis =
              kp <= qq && (window == 0 || static_cast<int64_t>(qq) - kp < window || kp < sink);
          if (!vis) v = -INFINITY;
        }
        s_acc[j][c] = v;
      }
    // Online softmax per row (the 4 lanes of a quad share a row).
    float corr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kFlashKeys / 8; ++j)
        mx = fmaxf(mx, fmaxf(s_acc[j][2 * i], s_acc[j][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[i], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      corr[i] = exp2f(m_run[i] - m_use);
      m_run[i] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kFlashKeys / 8; ++j) {
        const float p0 = exp2f(s_acc[j][2 * i] - m_use), p1 = exp2f(s_acc[j][2 * i + 1] - m_use);
        s_acc[j][2 * i] = p0;
        s_acc[j][2 * i + 1] = p1;
        sum += p0 + p1;
      }
      l_run[i] = l_run[i] * corr[i] + sum;  // quad-partial sum; reduced at the end
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o_acc[j][0] *= corr[0];
      o_acc[j][1] *= corr[0];
      o_acc[j][2] *= corr[1];
      o_acc[j][3] *= corr[1];
    }
    // O += P V: P (16 x 64) from the S accumulators as A fragments, V via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kFlashKeys / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_bf16(s_acc[2 * kk][0], s_acc[2 * kk][1]);
      a[1] = pack_bf16(s_acc[2 * kk][2], s_acc[2 * kk][3]);
      a[2] = pack_bf16(s_acc[2 * kk + 1][0], s_acc[2 * kk + 1][1]);
      a[3] = pack_bf16(s_acc[2 * kk + 1][2], s_acc[2 * kk + 1][3]);
#pragma unroll
      for (int jp = 0; jp < D / 16; ++jp) {
        uint32_t b0, b1, b2, b3;
        const __nv_bfloat16* ptr =
            vb + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride + jp * 16 + (lane / 16) * 8;
        ldmatrix_x4_trans(b0, b1, b2, b3, ptr);
        mma_bf16(o_acc[2 * jp], a, b0, b1);
        mma_bf16(o_acc[2 * jp + 1], a, b2, b3);
      }
    }
    __syncthreads();  // buffer `cur` is refilled next iteration
  }
  cp_async_wait<0>();

  // ---- epilogue ----
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int32_t row = r0 + warp * 16 + lane / 4 + 8 * i;
    if (row >= seq_rows) continue;
    const int64_t t = tok0 + row / group;
    const int64_t head = int64_t{h} * group + row % group;
    const int64_t orow = t * p.hq + head;
    if (p.splits == 1) {
      const float inv_l = l_run[i] > 0.0f ? 1.0f / l_run[i] : 0.0f;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + 2 * (lane % 4);
        *reinterpret_cast<__nv_bfloat162*>(out + orow * D + col) =
            __floats2bfloat162_rn(o_acc[j][2 * i] * inv_l, o_acc[j][2 * i + 1] * inv_l);
      }
    } else {
      const int64_t prow = int64_t{split} * p.total_rows * p.hq + orow;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(part_o + prow * D + col) =
            make_float2(o_acc[j][2 * i], o_acc[j][2 * i + 1]);
      }
      if (lane % 4 == 0) {
        part_ml[prow * 2] = m_run[i];
        part_ml[prow * 2 + 1] = l_run[i];
      }
    }
  }
}

// Combines the splits of every (token, query head) row; one warp per row. m is in log2 units.
// part_o: [splits, T * Hq, D]; part_ml: [splits, T * Hq, 2]; out: [T * Hq, D]
template <int D>
__global__ void paged_flash_merge_kernel(const float* __restrict__ part_o,
                                         const float* __restrict__ part_ml, int splits,
                                         int64_t rows, __nv_bfloat16* __restrict__ out) {
  static_assert(D % 32 == 0, "paged_flash_merge_kernel: D / 32 columns per lane");
  const int64_t row = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float m_all = -INFINITY;
  for (int s = 0; s < splits; ++s) m_all = fmaxf(m_all, part_ml[(s * rows + row) * 2]);
  const float m_use = m_all == -INFINITY ? 0.0f : m_all;
  float acc[D / 32] = {};
  float l_all = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float l = part_ml[(s * rows + row) * 2 + 1];
    if (l <= 0.0f) continue;
    const float w = exp2f(part_ml[(s * rows + row) * 2] - m_use);
    l_all += l * w;
    const float* po = part_o + (s * rows + row) * D;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) acc[i] += w * po[lane + 32 * i];
  }
  const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i)
    out[row * D + lane + 32 * i] = __float2bfloat16_rn(acc[i] * inv_l);
}

}  // namespace redknot::cuda
