#include "data/sampler.h"

#include "common/errors.h"

namespace pe::data {

uint64_t mix64(uint64_t x) {  // splitmix64's finaliser: a good 64-bit avalanche
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

RandomPermutation::RandomPermutation(uint64_t n, uint64_t key) : n_(n) {
  unsigned bits = 1;
  while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
  mask_ = bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
  shift_ = bits / 2 > 0 ? bits / 2 : 1;
  uint64_t k = key;
  for (uint64_t& r : keys_) r = k = mix64(k);
}

uint64_t RandomPermutation::hash(uint64_t x) const {
  // Each step is a bijection on [0, 2^bits): xor / add a constant, multiply by an odd
  // number (low bits spread upwards), xor-shift right (high bits spread downwards).
  for (uint64_t k : keys_) {
    x = (x ^ k) & mask_;
    x = (x * (k | 1)) & mask_;
    x ^= x >> shift_;
    x = (x + (k >> 32)) & mask_;
    x = (x * 0x2545F4914F6CDD1Dull) & mask_;
    x ^= x >> shift_;
  }
  return x;
}

uint64_t RandomPermutation::operator()(uint64_t i) const {
  if (n_ <= 1) return i;
  do {
    i = hash(i);
  } while (i >= n_);
  return i;
}

Sampler::Sampler(const SamplerConfig& c) : cfg_(c) {
  if (c.batch_size == 0) throw InvalidArgument("batch_size must be positive");
  if (c.world_size == 0 || c.rank >= c.world_size)
    throw InvalidArgument("rank must be in [0, world_size), got rank " + std::to_string(c.rank) + " of " +
                          std::to_string(c.world_size));
  if (c.order == Order::kBlock && (c.block_size == 0 || c.window_blocks == 0))
    throw InvalidArgument("block shuffle needs block_size > 0 and window_blocks > 0");
  const uint64_t n = c.num_samples, w = c.world_size;
  if (c.drop_last) {
    num_batches_ = (n / w) / c.batch_size;  // the smallest rank's full batches: equal on all ranks
    rank_samples_ = num_batches_ * c.batch_size;
  } else {
    rank_samples_ = n > c.rank ? (n - c.rank + w - 1) / w : 0;
    num_batches_ = (rank_samples_ + c.batch_size - 1) / c.batch_size;
  }
}

uint64_t Sampler::batch_len(uint64_t b) const {
  if (b >= num_batches_) throw InvalidArgument("batch index out of range");
  uint64_t start = b * cfg_.batch_size;
  uint64_t left = rank_samples_ - start;
  return left < cfg_.batch_size ? left : cfg_.batch_size;
}

void Sampler::batch_indices(uint64_t epoch, uint64_t b, uint64_t* out) const {
  const uint64_t len = batch_len(b);
  const uint64_t first = b * cfg_.batch_size;
  if (cfg_.order == Order::kFull) {  // the hot path: build the permutation once per batch
    RandomPermutation perm(cfg_.num_samples, mix64(cfg_.seed) ^ mix64(~epoch));
    for (uint64_t k = 0; k < len; ++k) out[k] = perm(cfg_.rank + cfg_.world_size * (first + k));
    return;
  }
  for (uint64_t k = 0; k < len; ++k) out[k] = sample_at(epoch, cfg_.rank + cfg_.world_size * (first + k));
}

uint64_t Sampler::sample_at(uint64_t epoch, uint64_t pos) const {
  switch (cfg_.order) {
    case Order::kSequential:
      return pos;
    case Order::kFull:
      return RandomPermutation(cfg_.num_samples, mix64(cfg_.seed) ^ mix64(~epoch))(pos);
    case Order::kBlock:
      return block_sample(epoch, pos);
  }
  return pos;
}

uint64_t Sampler::block_sample(uint64_t epoch, uint64_t pos) const {
  const uint64_t bs = cfg_.block_size, n = cfg_.num_samples;
  const uint64_t full_blocks = n / bs;
  const uint64_t epoch_key = mix64(mix64(cfg_.seed) ^ mix64(~epoch));
  const uint64_t full_end = full_blocks * bs;
  if (pos >= full_end) {  // the trailing partial block: shuffled on its own, last
    return full_end + RandomPermutation(n - full_end, epoch_key ^ 0x7A11ull)(pos - full_end);
  }
  const uint64_t window_samples = cfg_.window_blocks * bs;
  const uint64_t window = pos / window_samples;
  const uint64_t first_block = window * cfg_.window_blocks;
  const uint64_t blocks_here =
      full_blocks - first_block < cfg_.window_blocks ? full_blocks - first_block : cfg_.window_blocks;
  const uint64_t inner = RandomPermutation(blocks_here * bs, mix64(epoch_key + window))(pos - window * window_samples);
  const uint64_t block = RandomPermutation(full_blocks, epoch_key)(first_block + inner / bs);
  return block * bs + inner % bs;
}

}  // namespace pe::data
