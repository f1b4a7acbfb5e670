#include "data/block_cache.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include "common/mapped_read_guard.h"

namespace pe::data {

BlockCache::BlockCache(const std::vector<std::pair<const uint8_t*, uint64_t>>& regions, uint64_t budget_bytes,
                       FillCheck check_before_fill)
    : budget_(budget_bytes), check_before_fill_(std::move(check_before_fill)) {
  regions_.reserve(regions.size());
  for (const auto& [base, bytes] : regions) {
    uint64_t n = budget_ == 0 ? 0 : (bytes + kBlockBytes - 1) / kBlockBytes;
    regions_.push_back(Region{base, bytes, std::unique_ptr<Block[]>(n == 0 ? nullptr : new Block[n])});
  }
}

BlockCache::~BlockCache() {
  if (budget_ == 0) return;
  for (Region& r : regions_) {
    uint64_t n = (r.bytes + kBlockBytes - 1) / kBlockBytes;
    for (uint64_t b = 0; b < n; ++b) std::free(r.blocks[b].data);
  }
}

void BlockCache::release_claim(Block& blk, uint64_t len) {
  used_.fetch_sub(len, std::memory_order_relaxed);
  blk.state.store(kEmpty, std::memory_order_release);
}

const uint8_t* BlockCache::block_data(size_t region, uint64_t block) {
  Region& r = regions_[region];
  Block& blk = r.blocks[block];
  uint8_t state = blk.state.load(std::memory_order_acquire);
  if (state == kReady) return blk.data;
  if (state == kFilling || state == kRefused || full_.load(std::memory_order_relaxed)) return nullptr;
  const uint64_t start = block * kBlockBytes;
  const uint64_t len = r.bytes - start < kBlockBytes ? r.bytes - start : kBlockBytes;
  if (check_before_fill_ && !check_before_fill_(region, start, len)) {
    uint8_t empty = kEmpty;  // only from kEmpty: a block being filled or filled stays so
    blk.state.compare_exchange_strong(empty, kRefused, std::memory_order_acq_rel);
    return nullptr;
  }
  // Claim first, charge second: if losers of the claim charged too, the count could pass the
  // budget for a moment and make a reader of another block mark the cache full for good.
  uint8_t expected = kEmpty;
  if (!blk.state.compare_exchange_strong(expected, kFilling, std::memory_order_acq_rel))
    return nullptr;  // another thread is filling it
  if (used_.fetch_add(len, std::memory_order_relaxed) + len > budget_) {
    full_.store(true, std::memory_order_relaxed);
    release_claim(blk, len);
    return nullptr;
  }
  auto* data = static_cast<uint8_t*>(std::malloc(len));
  if (data == nullptr) {  // out of memory: stop caching rather than fail the read
    full_.store(true, std::memory_order_relaxed);
    release_claim(blk, len);
    return nullptr;
  }
  try {
    guard_mapped_reads([&] { std::memcpy(data, r.base + start, len); });
  } catch (const MappedReadFault&) {
    std::free(data);
    release_claim(blk, len);
    throw;
  }
  blk.data = data;
  blk.state.store(kReady, std::memory_order_release);
  return data;
}

void BlockCache::copy(size_t region, uint64_t offset, uint64_t n, uint8_t* dst) {
  if (budget_ == 0) {
    std::memcpy(dst, regions_[region].base + offset, n);
    return;
  }
  Region& r = regions_[region];
  while (n > 0) {
    const uint64_t block = offset / kBlockBytes;
    const uint64_t in_block = offset - block * kBlockBytes;
    const uint64_t len = kBlockBytes - in_block < n ? kBlockBytes - in_block : n;
    const uint8_t* cached = block_data(region, block);
    if (cached != nullptr) {
      std::memcpy(dst, cached + in_block, len);
      hits_.fetch_add(len, std::memory_order_relaxed);
    } else {
      std::memcpy(dst, r.base + offset, len);
      misses_.fetch_add(len, std::memory_order_relaxed);
    }
    dst += len;
    offset += len;
    n -= len;
  }
}

}  // namespace pe::data
