#include "data/block_checksum_writer.h"

#include "common/crc32c.h"
#include "common/errors.h"

namespace pe::data {

BlockChecksumWriter::BlockChecksumWriter(uint64_t block_bytes) : block_bytes_(block_bytes) {
  if (block_bytes == 0 || (block_bytes & (block_bytes - 1)) != 0)
    throw InvalidArgument("block_bytes must be a power of two, got " + std::to_string(block_bytes));
}

void BlockChecksumWriter::update(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  payload_crc_ = crc32c_extend(payload_crc_, p, n);
  payload_bytes_ += n;
  while (n > 0) {
    const uint64_t take = block_bytes_ - open_bytes_ < n ? block_bytes_ - open_bytes_ : n;
    open_crc_ = crc32c_extend(open_crc_, p, take);
    open_bytes_ += take;
    p += take;
    n -= take;
    if (open_bytes_ == block_bytes_) {
      done_.push_back(open_crc_);
      open_crc_ = 0;
      open_bytes_ = 0;
    }
  }
}

std::vector<uint32_t> BlockChecksumWriter::table() const {
  std::vector<uint32_t> out = done_;
  if (open_bytes_ > 0) out.push_back(open_crc_);
  return out;
}

}  // namespace pe::data
