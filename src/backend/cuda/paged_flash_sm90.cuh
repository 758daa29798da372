// SegPaged prefill attention on Hopper warpgroup MMA (wgmma, sm_90a), bf16, head_dim 64 or 128.
//
// Same contract and work split as paged_flash_kernel (paged_flash.cuh): one block serves one
// (sequence, kv head) and a tile of 128 query rows, row r = token r / group, query head
// h * group + r % group, walking its head's CSR page list in key tiles (PageCursor) and skipping
// pages no row can see from positions alone. The block is warp-specialised:
//   - a producer warpgroup lists each key tile's slots (its first warp) and gathers their K/V
//     rows and positions with cp.async into a ring of kStages shared-memory stages; each
//     stage's `full` mbarrier completes when its copies have landed, its `empty` mbarrier when
//     both consumers are done with it;
//   - two consumer warpgroups own 64 query rows each and, per key tile, issue
//       S = Q·Kᵀ  as wgmma m64 x kKeys x 16, Q and K read by the tensor cores from shared memory,
//       O += P·V  as wgmma m64 x D x 16, P from registers (the S accumulators in bf16), V from
//                 shared memory read transposed (MN-major),
//     with the online softmax in registers. The two warpgroups take turns issuing S (two named
//     barriers), so one's softmax overlaps the other's tensor-core work.
// Q, K and V tiles use the 128-byte-swizzled layout of wgmma.cuh, written by 16-byte cp.async
// whose consecutive lanes read consecutive chunks of a row (coalesced) and land in distinct
// banks (swizzle).
#pragma once
#include <cuda_bf16.h>

#include "backend/cuda/paged_flash.cuh"
#include "backend/cuda/wgmma.cuh"

namespace redknot::cuda {

// Two consumer warpgroups and the producer warpgroup.
inline constexpr int kSm90FlashThreads = 256 + 128;

template <int D, int kKeys, int kStages>
struct Sm90FlashSmem {
  static constexpr int kRows = 128;  // two consumer warpgroups x 64 rows
  static constexpr size_t kQ = size_t{kRows} * D * 2;
  static constexpr size_t kKV = size_t{kKeys} * D * 2;  // one stage of K (or of V)
  // kpos [kStages][kKeys], slots [kStages][kKeys], meta [kStages][2] (count, all visible), tile [2]
  static constexpr size_t kInts = size_t{kStages} * kKeys * 2 + 2 * kStages + 2;
  static constexpr size_t kBarOffset = (kQ + 2 * kStages * kKV + kInts * 4 + 7) / 8 * 8;
  // + full[], empty[]; + 1 KB to align the tiles to the 1024-byte swizzle atom
  static constexpr size_t kBytes = kBarOffset + 2 * kStages * 8 + 1024;
};

// s: [64 rows, N keys] of the warpgroup (accumulator layout) = Q [64, 16] · K [N, 16]ᵀ, one k step.
template <int N, bool kFirst>
__device__ __forceinline__ void wgmma_qk(float (&s)[N / 2], uint64_t desc_q, uint64_t desc_k) {
  if constexpr (N == 128 && kFirst)
    wgmma_ss_n128_first(s, desc_q, desc_k);
  else if constexpr (N == 128)
    wgmma_ss_n128(s, desc_q, desc_k);
  else if constexpr (kFirst)
    wgmma_ss_n64_first(s, desc_q, desc_k);
  else
    wgmma_ss_n64(s, desc_q, desc_k);
}
// o: [64 rows, D] += P [64, 16 keys] (a: bf16 A fragments) · V [16 keys, D], one k step.
template <int D>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 2], const uint32_t (&a)[4],
                                         uint64_t desc_v) {
  if constexpr (D == 128)
    wgmma_rs_n128_tb(o, a, desc_v);
  else
    wgmma_rs_n64_tb(o, a, desc_v);
}

// q: [T, Hq, D]; k_pool, v_pool: [slots, D] of this layer; pos_pool: [slots]; q_pos: [T];
// plan arrays as paged_flash_kernel; out: [T, Hq, D]; part_o/part_ml: split-KV workspace.
template <int D, int kKeys, int kStages>
__global__ void __launch_bounds__(kSm90FlashThreads, 1) paged_flash_sm90_kernel(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const int32_t* __restrict__ pos_pool,
    const int32_t* __restrict__ q_pos, const int32_t* __restrict__ qo_indptr,
    const int32_t* __restrict__ kv_indptr, const int32_t* __restrict__ page_indices,
    const int32_t* __restrict__ page_lengths, const int32_t* __restrict__ head_window,
    const int32_t* __restrict__ head_sink, FlashParams p, __nv_bfloat16* __restrict__ out,
    float* __restrict__ part_o, float* __restrict__ part_ml) {
  // 128-byte swizzled rows hold 64 bf16, and wgmma_pv has n64 / n128 only: head_dim 32 runs on
  // paged_flash_kernel instead.
  static_assert(D == 64 || D == 128, "paged_flash_sm90_kernel: head_dim 64 or 128 only");
  using S = Sm90FlashSmem<D, kKeys, kStages>;
  constexpr int kRows = S::kRows, kChunks = D / 8;
  extern __shared__ __align__(16) unsigned char smem_dyn[];
  unsigned char* smem_raw = smem_dyn + ((1024 - smem_u32(smem_dyn) % 1024) % 1024);
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem_raw + S::kQ);
  __nv_bfloat16* v_s = reinterpret_cast<__nv_bfloat16*>(smem_raw + S::kQ + kStages * S::kKV);
  int32_t* kpos_s = reinterpret_cast<int32_t*>(smem_raw + S::kQ + 2 * kStages * S::kKV);
  int32_t* slot_s = kpos_s + kStages * kKeys;
  int32_t* meta_s = slot_s + kStages * kKeys;
  int32_t* tile_s = meta_s + 2 * kStages;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw + S::kBarOffset);
  uint64_t* empty = full + kStages;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int h = blockIdx.y, split = blockIdx.z;
  const int group = p.group;

  if (warp == 0) find_row_tile(qo_indptr, p.num_seqs, group, kRows, lane, tile_s);
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 256);   // 128 cp.async arrivals + 128 plain ones (the listing's writes)
      mbar_init(&empty[s], 256);  // every consumer thread
    }
  }
  __syncthreads();
  const int32_t seq = tile_s[0];
  if (seq < 0) return;
  const int32_t tok0 = qo_indptr[seq];
  const int32_t seq_rows = (qo_indptr[seq + 1] - tok0) * group;
  const int32_t r0 = tile_s[1] * kRows;
  const int32_t window = head_window[h], sink = head_sink[h];
  constexpr uint32_t kStageBytes = uint32_t{kKeys} * D * 2;

  if (warp >= 8) {
    // ---- producer warpgroup: warp 8 lists each tile, all 128 threads copy it ----
    const int ptid = tid - 256;
    int32_t q_lo = 0, q_hi = 0;
    if (warp == 8) tile_query_range(q_pos, tok0, r0, kRows, seq_rows, group, lane, q_lo, q_hi);
    PageCursor pages(page_indices, page_lengths, pos_pool, p, seq, h, split, kv_indptr);
    for (int it = 0;; ++it) {
      const int st = it % kStages;
      mbar_wait(&empty[st], ((it / kStages) & 1) ^ 1);
      int32_t* slots = slot_s + st * kKeys;
      if (warp == 8)
        pages.fill<kKeys>(slots, kpos_s + st * kKeys, meta_s + 2 * st, meta_s + 2 * st + 1, lane,
                          q_lo, q_hi, window, sink);
      named_barrier_sync(5, 128);
      const int32_t n = meta_s[2 * st];
      if (n > 0) {
        unsigned char* k_st = reinterpret_cast<unsigned char*>(k_s) + st * S::kKV;
        unsigned char* v_st = reinterpret_cast<unsigned char*>(v_s) + st * S::kKV;
        for (int i = ptid; i < kKeys * kChunks; i += 128) {
          const int r = i / kChunks, c = i % kChunks;
          const int32_t slot = slots[r];  // -1 past n: zero rows (finite P·V)
          const int64_t src = (slot >= 0 ? int64_t{slot} : 0) * D + c * 8;
          const uint32_t dst = sw128_offset(kKeys, r, c);
          cp_async16(k_st + dst, k_pool + src, slot >= 0 ? 16 : 0);
          cp_async16(v_st + dst, v_pool + src, slot >= 0 ? 16 : 0);
        }
        for (int r = ptid; r < n; r += 128) cp_async4(kpos_s + st * kKeys + r, pos_pool + slots[r]);
      }
      mbar_arrive_cp_async(&full[st]);
      mbar_arrive(&full[st]);
      if (n == 0) break;
    }
    cp_async_wait<0>();
    return;
  }

  // ---- consumers: warpgroup wg owns rows [64 wg, 64 wg + 64) of the tile ----
  const int wg = warp / 4, wtid = tid % 128, wrow = (warp % 4) * 16;
  for (int i = wtid; i < 64 * kChunks; i += 128) {
    const int r = i / kChunks, c = i % kChunks;
    const int32_t row = r0 + wg * 64 + r;
    const bool valid = row < seq_rows;
    const int64_t t = tok0 + (valid ? row / group : 0);
    const int64_t head = int64_t{h} * group + (valid ? row % group : 0);
    cp_async16(reinterpret_cast<unsigned char*>(q_s) + sw128_offset(kRows, wg * 64 + r, c),
               q + (t * p.hq + head) * D + c * 8, valid ? 16 : 0);
  }
  cp_async_commit();
  int32_t qp[2];  // query positions of this thread's two rows (-1: padding, sees nothing)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int32_t row = r0 + wg * 64 + wrow + lane / 4 + 8 * i;
    qp[i] = row < seq_rows ? q_pos[tok0 + row / group] : -1;
  }
  cp_async_wait<0>();
  fence_proxy_async_smem();
  named_barrier_sync(1 + wg, 128);

  // Descriptors: this warpgroup's Q rows (K-major A), K stage (K-major B: keys x D), V stage
  // (MN-major B: keys along K, D along N in blocks of 64 kKeys * 128 bytes apart). A k step of
  // 16 along D moves 32 bytes inside a 64-element block (blocks kRows or kKeys * 128 apart); a
  // k step of 16 keys moves two 8-row groups (2048 bytes).
  const uint64_t desc_q = wgmma_desc_sw128(smem_u32(q_s) + wg * 64 * 128, 16, 1024);
  const uint64_t desc_k0 = wgmma_desc_sw128(smem_u32(k_s), 16, 1024);
  const uint64_t desc_v0 = wgmma_desc_sw128(smem_u32(v_s), kKeys * 128, 1024);
  auto k_step = [](int rows, int kk) { return uint32_t((kk >> 2) * rows * 128 + (kk & 3) * 32); };

  // Accumulators in the wgmma layout: per warp 16 rows; element 4j + c is row lane/4 (+8 for
  // c >= 2), column 8j + 2(lane%4) + (c & 1).
  float o_acc[D / 2];
  float s_acc[kKeys / 2];  // written whole by each tile's first k step
#pragma unroll
  for (int j = 0; j < D / 2; ++j) o_acc[j] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  // Turns for issuing S: barrier 3 is warpgroup 0's, 4 is warpgroup 1's; 0 goes first.
  if (wg == 1) named_barrier_arrive(3, 256);
  for (int it = 0;; ++it) {
    const int st = it % kStages;
    mbar_wait(&full[st], (it / kStages) & 1);
    fence_proxy_async_smem();  // the stage was written through the generic proxy (cp.async)
    if (meta_s[2 * st] == 0) break;
    const bool all_visible = meta_s[2 * st + 1] != 0;

    named_barrier_sync(3 + wg, 256);
    wgmma_fence();
    const uint64_t desc_k = wgmma_desc_advance(desc_k0, st * kStageBytes);
    wgmma_qk<kKeys, true>(s_acc, desc_q, desc_k);
#pragma unroll
    for (int kk = 1; kk < D / 16; ++kk)
      wgmma_qk<kKeys, false>(s_acc, wgmma_desc_advance(desc_q, k_step(kRows, kk)),
                             wgmma_desc_advance(desc_k, k_step(kKeys, kk)));
    wgmma_commit();
    named_barrier_arrive(3 + (wg ^ 1), 256);
    wgmma_wait<0>();
    wgmma_fence_operand(s_acc);

    if (!all_visible) mask_scores<kKeys>(s_acc, kpos_s + st * kKeys, qp, window, sink, lane);
    float corr[2];
    online_softmax<kKeys>(s_acc, m_run, l_run, p.scale_log2, corr);
    rescale_rows<D>(o_acc, corr);
    // O += P V over the tile's keys in k steps of 16 (P's A fragment from two S n-tiles).
    uint32_t a[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) p_fragment<kKeys>(s_acc, kk, a[kk]);
    wgmma_fence();
    const uint64_t desc_v = wgmma_desc_advance(desc_v0, st * kStageBytes);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
      wgmma_pv<D>(o_acc, a[kk], wgmma_desc_advance(desc_v, kk * 2048));
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(o_acc);
    mbar_arrive(&empty[st]);
  }
  if (wg == 0) named_barrier_sync(3, 256);  // warpgroup 1's last hand-over

  store_rows<D>(o_acc, m_run, l_run, p, tok0, r0 + wg * 64 + wrow + lane / 4, seq_rows, h, split,
                lane, out, part_o, part_ml);
}

}  // namespace redknot::cuda
