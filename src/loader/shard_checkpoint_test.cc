#include "loader/shard_checkpoint.h"

#include <gtest/gtest.h>

#include <cstring>

#include "loader/test_util.h"

namespace redknot {
namespace {

using testing_util::expect_error;
using testing_util::ref_dir;

ModelConfig config(int64_t heads, int64_t kv, int64_t ffn, int64_t vocab) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 64;
  c.intermediate_size = ffn;
  c.num_layers = 2;
  c.num_heads = heads;
  c.num_kv_heads = kv;
  c.head_dim = 16;
  return c;
}

TEST(PlanTpShard, SplitsHeadsAndReplicatesKvHeadsBelowTheRankCount) {
  // 8 query heads over 2 kv heads (groups of 4) on 4 ranks: ranks 0,1 read kv head 0, 2,3 head 1.
  const ModelConfig c = config(8, 2, 100, 510);
  const int64_t want_kv[] = {0, 0, 1, 1};
  for (int r = 0; r < 4; ++r) {
    const TpShard s = plan_tp_shard(c, r, 4);
    EXPECT_EQ(s.q_head0, 2 * r);
    EXPECT_EQ(s.kv_head0, want_kv[r]);
    EXPECT_EQ(s.ffn0, r * 25);
    EXPECT_EQ(s.vocab_slice, 128);  // ceil(510 / 4): equal parts for the gather
    EXPECT_EQ(s.vocab0, 128 * r);
    EXPECT_EQ(s.vocab_rows, r < 3 ? 128 : 510 - 384);
  }
  // kv heads split when there are enough: 8 kv heads on 4 ranks, two each.
  EXPECT_EQ(plan_tp_shard(config(16, 8, 64, 64), 3, 4).kv_head0, 6);
}

TEST(PlanTpShard, RefusesShapesThatDoNotSplit) {
  expect_error([] { plan_tp_shard(config(8, 2, 100, 64), 0, 3); }, {"does not divide", "8"});
  expect_error([] { plan_tp_shard(config(12, 6, 100, 64), 0, 4); }, {"kv heads"});
  expect_error([] { plan_tp_shard(config(8, 2, 100, 64), 2, 2); }, {"rank 2"});
  expect_error([] { plan_tp_shard(config(8, 2, 100, 64), 0, 0); }, {">= 1"});
}

// Rows [r0, r0+n) of a 2-D f32/bf16 tensor compared bytewise with `part`'s first n rows.
void expect_rows(const Tensor& full, int64_t r0, const Tensor& part, int64_t n) {
  const int64_t row = dtype_bytes(full.dtype(), full.rank() == 2 ? full.dim(1) : 1);
  EXPECT_EQ(std::memcmp(static_cast<const char*>(full.raw()) + r0 * row, part.raw(), n * row), 0);
}

// Every rank's slices put back together are the checkpoint (q/k/v, biases, o_proj, FFN, vocab).
TEST(ShardCheckpoint, SlicesReassembleTheModel) {
  const std::string dir = ref_dir("qwen2-tiny");  // biases and tied embeddings
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "no " << dir;
  const Checkpoint full = load_checkpoint(dir);
  const ModelConfig& g = full.config;
  const int64_t hd = g.head_dim;
  for (int R : {2, 4}) {
    for (int r = 0; r < R; ++r) {
      SCOPED_TRACE("R=" + std::to_string(R) + " rank " + std::to_string(r));
      const Checkpoint c = shard_checkpoint(full, r, R);
      const TpShard& s = c.tp;
      EXPECT_EQ(c.config.num_heads, g.num_heads / R);
      EXPECT_EQ(c.config.num_kv_heads, std::max<int64_t>(1, g.num_kv_heads / R));
      EXPECT_EQ(c.config.vocab_size, g.vocab_size);
      const std::string l1 = "model.layers.1.";
      expect_rows(full.get(l1 + "self_attn.q_proj.weight"), s.q_head0 * hd,
                  c.get(l1 + "self_attn.q_proj.weight"), c.config.num_heads * hd);
      expect_rows(full.get(l1 + "self_attn.k_proj.bias"), s.kv_head0 * hd,
                  c.get(l1 + "self_attn.k_proj.bias"), c.config.num_kv_heads * hd);
      expect_rows(full.get(l1 + "mlp.up_proj.weight"), s.ffn0, c.get(l1 + "mlp.up_proj.weight"),
                  c.config.intermediate_size);
      // o_proj: column j of the slice is column q_head0*hd + j of the model.
      const Tensor& o = full.get(l1 + "self_attn.o_proj.weight");
      const Tensor& os = c.get(l1 + "self_attn.o_proj.weight");
      ASSERT_EQ(os.dim(1), c.config.num_heads * hd);
      for (int64_t i = 0; i < o.dim(0); i += 17)
        for (int64_t j = 0; j < os.dim(1); j += 5)
          EXPECT_EQ(os.data<float>()[i * os.dim(1) + j],
                    o.data<float>()[i * o.dim(1) + s.q_head0 * hd + j]);
      // Vocab slice, then zero rows (padding and the row foreign ids read).
      const Tensor& e = c.get("model.embed_tokens.weight");
      ASSERT_EQ(e.dim(0), s.vocab_slice + 1);
      expect_rows(full.get("model.embed_tokens.weight"), s.vocab0, e, s.vocab_rows);
      for (int64_t j = 0; j < e.dim(1); ++j)
        EXPECT_EQ(e.data<float>()[s.vocab_slice * e.dim(1) + j], 0.0f);
      expect_rows(full.get("model.embed_tokens.weight"), s.vocab0, c.get("lm_head.weight"),
                  s.vocab_rows);  // tied: the lm_head slice is the embedding's
    }
  }
  // Replicated kv heads: on 4 ranks, ranks 0 and 1 hold the same k_proj rows.
  EXPECT_EQ(
      std::memcmp(shard_checkpoint(full, 0, 4).get("model.layers.0.self_attn.k_proj.weight").raw(),
                  shard_checkpoint(full, 1, 4).get("model.layers.0.self_attn.k_proj.weight").raw(),
                  static_cast<size_t>(hd * g.hidden_size * 4)),
      0);
}

}  // namespace
}  // namespace redknot
