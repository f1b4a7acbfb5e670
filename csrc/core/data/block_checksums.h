// The per-block CRC32C table of one payload, and which of its blocks this process has checked.
//
// Format version 2 files end with one CRC32C per block_bytes of payload (the last block may
// be short), a table the header's own checksum covers. A block is checked the first time any
// byte of it is read; after that a read costs one atomic load per block it touches.
//
// Concurrency: any number of threads. Two first readers of a block may both check it (both
// compute the same answer); a block is marked only after its check passed, so a block that
// failed fails again for every reader.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace pe::data {

class BlockChecksums {
 public:
  static constexpr uint64_t kNoBlock = UINT64_MAX;

  // payload: payload_bytes of mapped payload; table: its ceil(payload_bytes / block_bytes)
  // stored CRC32Cs (little-endian uint32, in the mapping). block_bytes: a power of two.
  BlockChecksums(const uint8_t* payload, uint64_t payload_bytes, uint64_t block_bytes, const uint8_t* table);

  static uint64_t num_blocks(uint64_t payload_bytes, uint64_t block_bytes) {
    return payload_bytes / block_bytes + (payload_bytes % block_bytes != 0);
  }

  // Checks each not yet checked block that [offset, offset + n) touches; returns the first
  // block whose bytes do not match its checksum, or kNoBlock. Reads mapped memory: call it
  // inside a mapped-read guard.
  uint64_t first_bad_block(uint64_t offset, uint64_t n) const {
    if (n == 0) return kNoBlock;
    const uint64_t last = (offset + n - 1) >> shift_;
    for (uint64_t b = offset >> shift_; b <= last; ++b)
      if (verified_[b].load(std::memory_order_acquire) == 0 && !check_block(b)) return b;
    return kNoBlock;
  }

  uint64_t block_bytes() const { return uint64_t{1} << shift_; }
  uint64_t num_blocks() const { return blocks_; }
  // Payload byte range of block b.
  uint64_t block_start(uint64_t b) const { return b << shift_; }
  uint64_t block_end(uint64_t b) const;

 private:
  bool check_block(uint64_t b) const;  // out of line: the first read of a block only

  const uint8_t* payload_;
  uint64_t payload_bytes_;
  uint32_t shift_;
  uint64_t blocks_;
  const uint8_t* table_;
  std::unique_ptr<std::atomic<uint8_t>[]> verified_;  // a byte per block: 1 = checked and good
};

}  // namespace pe::data
