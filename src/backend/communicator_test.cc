#include "backend/communicator.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "core/dtype.h"
#include "core/error.h"

namespace redknot {
namespace {

// Rank r's value at element i: distinct per rank and element, so a wrong or missing rank shows.
float value(int r, int64_t i) { return 0.25f * static_cast<float>(r + 1) + 0.001f * i; }

TEST(InProcessGroup, AllReduceSumsEveryRankF32) {
  for (int n : {1, 2, 3, 4}) {
    InProcessGroup g(n);
    std::vector<Tensor> out(static_cast<size_t>(n));
    run_ranks(g, [&](int r) {
      Tensor t = Tensor::host(DType::F32, {3, 5});
      for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = value(r, i);
      g.rank(r).all_reduce_sum(t);
      out[static_cast<size_t>(r)] = t;
    });
    for (int r = 0; r < n; ++r)
      for (int64_t i = 0; i < 15; ++i) {
        float want = 0;
        for (int q = 0; q < n; ++q) want += value(q, i);  // rank order, as documented
        EXPECT_EQ(out[static_cast<size_t>(r)].data<float>()[i], want) << n << " " << r << " " << i;
      }
  }
}

TEST(InProcessGroup, AllReduceBf16RoundsOnceAndAgreesAcrossRanks) {
  const int n = 4;
  InProcessGroup g(n);
  std::vector<std::vector<uint16_t>> out(n);
  run_ranks(g, [&](int r) {
    Tensor t = Tensor::host(DType::BF16, {64});
    for (int64_t i = 0; i < 64; ++i) t.data<uint16_t>()[i] = f32_to_bf16(value(r, i) * 3.1f);
    g.rank(r).all_reduce_sum(t);
    out[r].assign(t.data<uint16_t>(), t.data<uint16_t>() + 64);
  });
  for (int64_t i = 0; i < 64; ++i) {
    float acc = 0;
    for (int q = 0; q < n; ++q) acc += bf16_to_f32(f32_to_bf16(value(q, i) * 3.1f));
    for (int r = 0; r < n; ++r) EXPECT_EQ(out[r][i], f32_to_bf16(acc)) << r << " " << i;
  }
}

TEST(InProcessGroup, AllGatherStacksInRankOrder) {
  const int n = 3;
  InProcessGroup g(n);
  std::vector<Tensor> out(n);
  run_ranks(g, [&](int r) {
    Tensor in = Tensor::from_i32({r * 10, r * 10 + 1}, {2});
    Tensor o = Tensor::host(DType::I32, {n, 2});
    g.rank(r).all_gather(in, o);
    out[r] = o;
  });
  for (int r = 0; r < n; ++r)
    for (int q = 0; q < n; ++q) {
      EXPECT_EQ(out[r].data<int32_t>()[q * 2], q * 10);
      EXPECT_EQ(out[r].data<int32_t>()[q * 2 + 1], q * 10 + 1);
    }
}

// Many collectives back to back with ranks at different speeds: a fast rank must not overwrite
// its buffer before a slow one has read it (the sums would then be wrong).
TEST(InProcessGroup, BackToBackCollectivesWithSkewedRanks) {
  const int n = 4, steps = 200;
  InProcessGroup g(n);
  std::atomic<int> wrong{0};
  run_ranks(g, [&](int r) {
    for (int s = 0; s < steps; ++s) {
      Tensor t = Tensor::from_f32({static_cast<float>(s * n + r)}, {1});
      if ((s + r) % 7 == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
      g.rank(r).all_reduce_sum(t);
      const float want = static_cast<float>(s * n * n + n * (n - 1) / 2);
      if (t.data<float>()[0] != want) ++wrong;
      if (s % 50 == 0) g.rank(r).barrier();
    }
  });
  EXPECT_EQ(wrong.load(), 0);
}

TEST(InProcessGroup, AFailingRankWakesTheOthersAndItsErrorIsRethrown) {
  InProcessGroup g(3);
  try {
    run_ranks(g, [&](int r) {
      if (r == 1) throw Error("rank one broke");
      Tensor t = Tensor::host(DType::F32, {4});
      g.rank(r).all_reduce_sum(t);  // would wait forever for rank 1 without the abort
    });
    FAIL() << "expected the rank's error";
  } catch (const CollectiveAborted& e) {
    FAIL() << "got the abort, not the cause: " << e.what();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank one broke"), std::string::npos);
  }
}

TEST(InProcessGroup, MismatchedSizesThrowOnEveryRank) {
  InProcessGroup g(2);
  std::atomic<int> threw{0};
  run_ranks(g, [&](int r) {
    Tensor t = Tensor::host(DType::F32, {r == 0 ? 4 : 5});
    try {
      g.rank(r).all_reduce_sum(t);
    } catch (const Error&) {
      ++threw;
    }
  });
  EXPECT_EQ(threw.load(), 2);
}

}  // namespace
}  // namespace redknot
