// The writer's side of the block table (data/block_checksums.h): CRC32Cs of consecutive
// block_bytes pieces of a payload that arrives in chunks of any size, plus the CRC32C of the
// whole payload. Memory: 4 bytes per block (64 KiB per GiB of payload at 64 KiB blocks).
//
// Concurrency: one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pe::data {

class BlockChecksumWriter {
 public:
  explicit BlockChecksumWriter(uint64_t block_bytes);  // a power of two (InvalidArgument otherwise)

  void update(const void* data, size_t n);
  // The table so far: one CRC32C per block, the last one over a short block if the payload
  // does not fill it.
  std::vector<uint32_t> table() const;
  uint32_t payload_crc32c() const { return payload_crc_; }
  uint64_t payload_bytes() const { return payload_bytes_; }

 private:
  uint64_t block_bytes_;
  std::vector<uint32_t> done_;  // CRCs of the full blocks
  uint32_t open_crc_ = 0;       // the block being filled
  uint64_t open_bytes_ = 0;
  uint32_t payload_crc_ = 0;
  uint64_t payload_bytes_ = 0;
};

}  // namespace pe::data
