// Sampler and RandomPermutation: every order is a deterministic bijection of (seed, epoch),
// batches can be computed in any order (O(1) resume), and ranks split an epoch disjointly.
#include "data/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <vector>

#include "common/errors.h"

namespace pe::data {
namespace {

std::vector<uint64_t> epoch_order(const Sampler& s, uint64_t epoch) {
  std::vector<uint64_t> out;
  for (uint64_t b = 0; b < s.num_batches(); ++b) {
    std::vector<uint64_t> batch(s.batch_len(b));
    s.batch_indices(epoch, b, batch.data());
    out.insert(out.end(), batch.begin(), batch.end());
  }
  return out;
}

bool is_permutation_of_range(std::vector<uint64_t> v, uint64_t n) {
  std::sort(v.begin(), v.end());
  if (v.size() != n) return false;
  for (uint64_t i = 0; i < n; ++i)
    if (v[i] != i) return false;
  return true;
}

SamplerConfig config(uint64_t n, uint64_t batch, Order order, uint64_t seed = 7) {
  SamplerConfig c;
  c.num_samples = n;
  c.batch_size = batch;
  c.order = order;
  c.seed = seed;
  return c;
}

TEST(Sampler, RefusesBadConfigurations) {
  EXPECT_THROW(Sampler(config(10, 0, Order::kFull)), InvalidArgument);
  SamplerConfig c = config(10, 2, Order::kFull);
  c.world_size = 0;
  EXPECT_THROW(Sampler{c}, InvalidArgument);
  c.world_size = 2;
  c.rank = 2;
  EXPECT_THROW(Sampler{c}, InvalidArgument);
  SamplerConfig b = config(10, 2, Order::kBlock);
  b.block_size = 0;
  EXPECT_THROW(Sampler{b}, InvalidArgument);
  b.block_size = 2;
  b.window_blocks = 0;
  EXPECT_THROW(Sampler{b}, InvalidArgument);
}

TEST(RandomPermutation, IsABijectionForEverySize) {
  for (uint64_t n : {0ull, 1ull, 2ull, 3ull, 7ull, 8ull, 9ull, 255ull, 256ull, 1000ull, 4097ull}) {
    RandomPermutation p(n, 12345);
    std::vector<uint64_t> v;
    for (uint64_t i = 0; i < n; ++i) v.push_back(p(i));
    EXPECT_TRUE(is_permutation_of_range(v, n)) << n;
  }
  RandomPermutation a(1000, 1), b(1000, 2);
  int same = 0;
  for (uint64_t i = 0; i < 1000; ++i) same += a(i) == b(i);
  EXPECT_LT(same, 20) << "different keys should give unrelated permutations";
}

TEST(Sampler, SequentialOrderAndBatchLengths) {
  Sampler s(config(10, 4, Order::kSequential));
  EXPECT_EQ(s.num_batches(), 3u);
  EXPECT_EQ(s.batch_len(0), 4u);
  EXPECT_EQ(s.batch_len(2), 2u);  // the short last batch
  EXPECT_THROW(s.batch_len(3), InvalidArgument);
  EXPECT_EQ(epoch_order(s, 0), (std::vector<uint64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  SamplerConfig d = config(10, 4, Order::kSequential);
  d.drop_last = true;
  EXPECT_EQ(Sampler(d).num_batches(), 2u);
}

TEST(Sampler, FullShuffleIsAPermutationNewEveryEpochAndDeterministic) {
  for (uint64_t n : {1ull, 2ull, 31ull, 64ull, 1000ull}) {
    Sampler s(config(n, 8, Order::kFull));
    std::vector<uint64_t> e0 = epoch_order(s, 0), e1 = epoch_order(s, 1);
    EXPECT_TRUE(is_permutation_of_range(e0, n)) << n;
    EXPECT_TRUE(is_permutation_of_range(e1, n)) << n;
    if (n >= 31) {
      EXPECT_NE(e0, e1) << n;
    }
    EXPECT_EQ(e0, epoch_order(Sampler(config(n, 8, Order::kFull)), 0)) << "not a function of the config";
  }
  EXPECT_NE(epoch_order(Sampler(config(1000, 8, Order::kFull, 1)), 0),
            epoch_order(Sampler(config(1000, 8, Order::kFull, 2)), 0));
}

TEST(Sampler, AnyBatchCanBeComputedAloneSoResumeNeedsNoReplay) {
  for (Order order : {Order::kFull, Order::kBlock, Order::kSequential}) {
    SamplerConfig c = config(997, 10, order);
    c.block_size = 16;
    c.window_blocks = 3;
    Sampler s(c);
    std::vector<uint64_t> whole = epoch_order(s, 5);
    // Batches computed backwards, by a fresh sampler: the same samples at the same positions.
    Sampler resumed(c);
    for (uint64_t b = s.num_batches(); b-- > 0;) {
      std::vector<uint64_t> batch(resumed.batch_len(b));
      resumed.batch_indices(5, b, batch.data());
      for (size_t k = 0; k < batch.size(); ++k) ASSERT_EQ(batch[k], whole[b * 10 + k]);
      for (size_t k = 0; k < batch.size(); ++k) ASSERT_EQ(resumed.sample_at(5, b * 10 + k), batch[k]);
    }
  }
}

TEST(Sampler, RanksSplitAnEpochDisjointlyAndCoverIt) {
  for (bool drop_last : {false, true}) {
    std::multiset<uint64_t> seen;
    std::set<uint64_t> batches;
    for (uint64_t rank = 0; rank < 3; ++rank) {
      SamplerConfig c = config(100, 7, Order::kFull);
      c.world_size = 3;
      c.rank = rank;
      c.drop_last = drop_last;
      Sampler s(c);
      batches.insert(s.num_batches());
      for (uint64_t i : epoch_order(s, 2)) seen.insert(i);
    }
    for (uint64_t i : seen) EXPECT_EQ(seen.count(i), 1u) << "sample " << i << " on two ranks";
    if (drop_last) {
      EXPECT_EQ(batches, (std::set<uint64_t>{4}));  // (100 / 3) / 7 full batches on every rank
      EXPECT_EQ(seen.size(), 3u * 4 * 7);
    } else {
      EXPECT_EQ(seen.size(), 100u);  // every sample exactly once
    }
  }
}

TEST(Sampler, BlockShuffleReadsOneWindowOfBlocksAtATime) {
  SamplerConfig c = config(16 * 10 + 5, 1, Order::kBlock);  // 10 full blocks of 16, a partial one of 5
  c.block_size = 16;
  c.window_blocks = 3;
  Sampler s(c);
  std::vector<uint64_t> order = epoch_order(s, 0);
  ASSERT_TRUE(is_permutation_of_range(order, c.num_samples));
  // Windows of 3 blocks (48 samples; the last full window has 1 block): each window's samples
  // are exactly all samples of the blocks it touches.
  for (uint64_t start = 0; start < 160; start += 48) {
    uint64_t end = std::min<uint64_t>(start + 48, 160);
    std::set<uint64_t> blocks;
    for (uint64_t p = start; p < end; ++p) blocks.insert(order[p] / 16);
    EXPECT_EQ(blocks.size() * 16, end - start) << "window at " << start;
    for (uint64_t b : blocks) EXPECT_LT(b, 10u);
  }
  for (uint64_t p = 160; p < 165; ++p) EXPECT_GE(order[p], 160u);  // the partial block comes last
  EXPECT_NE(order, epoch_order(s, 1));
}

}  // namespace
}  // namespace pe::data
