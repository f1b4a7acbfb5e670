// The loader's order: a pure function of (seed, epoch, rank, world_size) and the geometry.
//
// Nothing is materialised per epoch: position j of the epoch maps to a sample through a
// keyed bijection, so any batch of any epoch can be computed directly. That makes worker
// threads independent (no shared cursor) and a mid-epoch resume O(1): no replay of skipped
// batches and no O(num_samples) permutation to rebuild.
//
// Orders:
//  - kSequential: 0, 1, 2, ...
//  - kFull: a pseudo-random permutation of the whole dataset, new for every epoch.
//  - kBlock: for data far larger than memory. Samples are grouped in blocks of
//    `block_size` consecutive samples; the block order is shuffled, and samples are
//    shuffled inside windows of `window_blocks` consecutive (shuffled) blocks, so only one
//    window's samples are read at a time. A trailing partial block is its own last window.
// Ranks: rank r takes positions r, r + W, r + 2W, ... (disjoint, covering). With drop_last
// every rank gets the same number of full batches (what DDP needs); without it every
// sample is seen exactly once across ranks and the last batch may be short.
// Concurrency: immutable; any thread may call any method.
#pragma once

#include <cstdint>

namespace pe::data {

enum class Order { kSequential = 0, kFull = 1, kBlock = 2 };

struct SamplerConfig {
  uint64_t num_samples = 0;
  uint64_t batch_size = 1;
  bool drop_last = false;
  Order order = Order::kFull;
  uint64_t seed = 0;
  uint64_t rank = 0;
  uint64_t world_size = 1;
  uint64_t block_size = 1;     // kBlock only: samples per block
  uint64_t window_blocks = 1;  // kBlock only: blocks shuffled together
};

// A keyed bijection on [0, n): an invertible hash on the smallest power-of-two domain
// >= n, applied repeatedly until the value lands in [0, n) ("cycle walking"; fewer than
// two steps on average). The hash is multiply / xor-shift rounds, each a bijection mod 2^k.
class RandomPermutation {
 public:
  RandomPermutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;

 private:
  uint64_t hash(uint64_t x) const;
  uint64_t n_;
  uint64_t mask_;
  unsigned shift_;
  uint64_t keys_[4];
};

uint64_t mix64(uint64_t x);

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& config);

  const SamplerConfig& config() const { return cfg_; }
  uint64_t num_batches() const { return num_batches_; }
  // Samples in batch b (batch_size except perhaps the last one when !drop_last).
  uint64_t batch_len(uint64_t b) const;
  // Writes the batch_len(b) sample indices of batch b of `epoch` for this rank.
  void batch_indices(uint64_t epoch, uint64_t b, uint64_t* out) const;
  // The sample at global position `pos` (before rank striding) of `epoch`.
  uint64_t sample_at(uint64_t epoch, uint64_t pos) const;

 private:
  uint64_t block_sample(uint64_t epoch, uint64_t pos) const;

  SamplerConfig cfg_;
  uint64_t rank_samples_ = 0;  // samples this rank consumes per epoch
  uint64_t num_batches_ = 0;
};

}  // namespace pe::data
