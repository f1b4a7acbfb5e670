#include "data/block_checksums.h"

#include <cstring>

#include "common/crc32c.h"

namespace pe::data {

BlockChecksums::BlockChecksums(const uint8_t* payload, uint64_t payload_bytes, uint64_t block_bytes,
                               const uint8_t* table)
    : payload_(payload),
      payload_bytes_(payload_bytes),
      shift_(static_cast<uint32_t>(__builtin_ctzll(block_bytes))),
      blocks_(num_blocks(payload_bytes, block_bytes)),
      table_(table),
      verified_(new std::atomic<uint8_t>[blocks_ == 0 ? 1 : blocks_]) {
  for (uint64_t b = 0; b < blocks_; ++b) verified_[b].store(0, std::memory_order_relaxed);
}

uint64_t BlockChecksums::block_end(uint64_t b) const {
  const uint64_t end = (b + 1) << shift_;
  return end < payload_bytes_ ? end : payload_bytes_;
}

bool BlockChecksums::check_block(uint64_t b) const {
  uint32_t stored = 0;
  std::memcpy(&stored, table_ + 4 * b, sizeof(stored));
  const uint64_t start = block_start(b);
  if (crc32c(payload_ + start, block_end(b) - start) != stored) return false;
  verified_[b].store(1, std::memory_order_release);
  return true;
}

}  // namespace pe::data
