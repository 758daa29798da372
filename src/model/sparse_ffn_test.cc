#include "model/sparse_ffn.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <random>

namespace redknot {
namespace {

// The definition, written plainly: rows by importance descending (ties: lower row first), taken
// until `mass` of the total is covered; plus each sequence's last recent_n rows and logit rows.
std::vector<int32_t> oracle(const SparseFfnConfig& cfg, int layer, const std::vector<float>& imp,
                            const Batch& b) {
  std::vector<int32_t> order(imp.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t x, int32_t y) { return imp[x] > imp[y]; });
  double total = 0, acc = 0;
  for (float v : imp) total += v;
  std::vector<char> keep(imp.size(), 0);
  for (int32_t r : order) {
    if (acc >= cfg.mass_for(layer) * total) break;
    keep[r] = 1;
    acc += imp[r];
  }
  // Dilation: every row within `dilate` positions of a top-mass row in the same sequence.
  std::vector<char> dilated = keep;
  for (const SeqSpan& sp : b.spans)
    for (int64_t i = 0; i < sp.count; ++i)
      for (int64_t j = 0; j < sp.count; ++j)
        if (keep[sp.begin + j] && std::abs(i - j) <= cfg.dilate) dilated[sp.begin + i] = 1;
  keep = dilated;
  for (const SeqSpan& sp : b.spans)
    for (int64_t i = std::max<int64_t>(0, sp.count - cfg.recent_n); i < sp.count; ++i)
      keep[sp.begin + i] = 1;
  for (int64_t r : b.logit_rows) keep[r] = 1;
  std::vector<int32_t> rows;
  for (size_t r = 0; r < keep.size(); ++r)
    if (keep[r]) rows.push_back(static_cast<int32_t>(r));
  return rows;
}

TEST(SparseFfn, SelectsTopMassRecentAndLogitRows) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    Batch b;
    // Some batches far larger than the first partition (64 rows or an eighth), so that it grows.
    const int n1 = 1 + static_cast<int>(rng() % (trial % 5 == 0 ? 3000 : 300));
    const int n2 = static_cast<int>(rng() % 50);
    b.add_sequence(0, std::vector<int32_t>(n1, 1), 0);
    if (n2 > 0) b.add_sequence(1, std::vector<int32_t>(n2, 1), 10);
    std::vector<float> imp(b.size());
    // Few distinct values, so ties are common.
    for (float& v : imp) v = static_cast<float>(rng() % 9) * 0.25f;
    SparseFfnConfig cfg;
    cfg.mass = 0.1 * (trial % 11);  // 0 .. 1
    cfg.recent_n = static_cast<int32_t>(rng() % 20);
    cfg.deep_start = 3;
    cfg.mass_deep = 0.1;
    cfg.dilate = trial % 3;  // 0, 1, 2
    for (int layer : {0, 5}) {
      const std::vector<int32_t> got = select_ffn_rows(cfg, layer, imp, b);
      EXPECT_EQ(got, oracle(cfg, layer, imp, b)) << "trial " << trial << " layer " << layer;
    }
  }
}

TEST(SparseFfn, MassOneKeepsEveryRowWithImportance) {
  Batch b;
  b.add_sequence(0, std::vector<int32_t>(6, 1), 0, /*last_logits=*/false);
  SparseFfnConfig cfg;
  cfg.mass = 1.0;
  cfg.recent_n = 0;
  const std::vector<float> imp = {0.5f, 0.0f, 2.0f, 1.0f, 0.0f, 0.25f};
  EXPECT_EQ(select_ffn_rows(cfg, 9, imp, b), (std::vector<int32_t>{0, 2, 3, 5}));
  cfg.mass = 0.5;  // 2.0 alone covers 2.0 / 3.75 >= 0.5
  EXPECT_EQ(select_ffn_rows(cfg, 9, imp, b), (std::vector<int32_t>{2}));
}

TEST(SparseFfn, LayerMassesOverrideTheTiers) {
  SparseFfnConfig cfg;
  cfg.dense_until = 2;
  cfg.mass = 0.8;
  cfg.deep_start = 4;
  cfg.mass_deep = 0.5;
  cfg.layer_mass = {1.0, 0.3, 0.6, 1.5};  // layer 1 sparse below dense_until, layer 3 dense
  EXPECT_TRUE(cfg.dense(0));
  EXPECT_FALSE(cfg.dense(1));
  EXPECT_DOUBLE_EQ(cfg.mass_for(1), 0.3);
  EXPECT_FALSE(cfg.dense(2));
  EXPECT_DOUBLE_EQ(cfg.mass_for(2), 0.6);
  EXPECT_TRUE(cfg.dense(3));
  // Past the list: the tiers.
  EXPECT_FALSE(cfg.dense(4));
  EXPECT_DOUBLE_EQ(cfg.mass_for(4), 0.5);
  EXPECT_DOUBLE_EQ(cfg.mass_for(7), 0.5);
  // Selection uses the layer's own mass: 2.0 of 3.75 covers 0.3 and 0.5 but not 0.6.
  Batch b;
  b.add_sequence(0, std::vector<int32_t>(6, 1), 0, /*last_logits=*/false);
  cfg.recent_n = 0;
  const std::vector<float> imp = {0.5f, 0.0f, 2.0f, 1.0f, 0.0f, 0.25f};
  EXPECT_EQ(select_ffn_rows(cfg, 1, imp, b), (std::vector<int32_t>{2}));
  EXPECT_EQ(select_ffn_rows(cfg, 2, imp, b), (std::vector<int32_t>{2, 3}));
}

TEST(SparseFfn, DilationKeepsNeighboursWithinTheSequence) {
  Batch b;
  b.add_sequence(0, std::vector<int32_t>(5, 1), 0, /*last_logits=*/false);
  b.add_sequence(1, std::vector<int32_t>(4, 1), 0, /*last_logits=*/false);
  SparseFfnConfig cfg;
  cfg.mass = 1.0;
  cfg.recent_n = 0;
  // Row 4 (the last of sequence 0) and row 7 hold all the importance.
  const std::vector<float> imp = {0, 0, 0, 0, 4, 0, 0, 1, 0};
  EXPECT_EQ(select_ffn_rows(cfg, 5, imp, b), (std::vector<int32_t>{4, 7}));
  cfg.dilate = 1;  // row 5 is sequence 1's first row: not a neighbour of row 4
  EXPECT_EQ(select_ffn_rows(cfg, 5, imp, b), (std::vector<int32_t>{3, 4, 6, 7, 8}));
  cfg.dilate = 2;
  EXPECT_EQ(select_ffn_rows(cfg, 5, imp, b), (std::vector<int32_t>{2, 3, 4, 5, 6, 7, 8}));
}

}  // namespace
}  // namespace redknot
