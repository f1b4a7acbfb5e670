// An in-memory cache of dataset bytes with a byte budget, kept across epochs.
//
// For data on slow or shared storage, where the OS page cache is evicted between epochs
// (LRU thrashes under "every sample once per epoch, random order"), this keeps a fixed
// set of 1 MiB blocks resident. Policy: a block is cached the first time it is read while
// budget remains, and is never evicted (CoorDL's MinIO: with a budget below the dataset
// size, only capacity misses remain, and there is no eviction churn). Misses read from the
// memory map directly.
//
// Integrity: before a block is filled, `check_before_fill` (if given) sees its byte range (the
// assembler checks the dataset's block checksums there); a block that fails is never cached
// and always read from the map, where the reader's own check refuses only the samples in the
// bad part. So the cache never holds bytes no check has passed. The fill copies from the map inside its own guarded region
// (common/mapped_read_guard.h): if the file shrank meanwhile, the block is left empty, its
// budget returned and MappedReadFault rethrown to the caller. copy() reads mapped memory, so
// call it inside a guarded region.
//
// Concurrency: lock-free; any number of reader threads. A block is filled by the one
// thread that wins its state from kEmpty to kFilling, published with a release store;
// others read the map meanwhile. Blocks are freed only in the destructor.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace pe::data {

class BlockCache {
 public:
  static constexpr uint64_t kBlockBytes = uint64_t{1} << 20;

  // Called with (region, offset, bytes) before a block is filled; false refuses the fill.
  using FillCheck = std::function<bool(size_t, uint64_t, uint64_t)>;

  // regions[i] = (base, bytes) of region i (a field-shard payload); budget 0 disables.
  BlockCache(const std::vector<std::pair<const uint8_t*, uint64_t>>& regions, uint64_t budget_bytes,
             FillCheck check_before_fill = nullptr);
  ~BlockCache();
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // Copies bytes [offset, offset + n) of region `region` into dst.
  void copy(size_t region, uint64_t offset, uint64_t n, uint8_t* dst);

  uint64_t budget_bytes() const { return budget_; }
  uint64_t cached_bytes() const { return used_.load(std::memory_order_relaxed); }
  uint64_t hit_bytes() const { return hits_.load(std::memory_order_relaxed); }
  uint64_t miss_bytes() const { return misses_.load(std::memory_order_relaxed); }

 private:
  enum State : uint8_t { kEmpty = 0, kFilling = 1, kReady = 2, kRefused = 3 };
  struct Block {
    std::atomic<uint8_t> state{kEmpty};
    uint8_t* data = nullptr;
  };
  struct Region {
    const uint8_t* base;
    uint64_t bytes;
    std::unique_ptr<Block[]> blocks;
  };

  // Returns the cached copy of a block, filling it if budget allows, else nullptr.
  const uint8_t* block_data(size_t region, uint64_t block);
  // Gives back a claimed block's budget and state after its fill failed.
  void release_claim(Block& blk, uint64_t len);

  std::vector<Region> regions_;
  const uint64_t budget_;
  const FillCheck check_before_fill_;
  std::atomic<uint64_t> used_{0};
  std::atomic<bool> full_{false};
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> misses_{0};
};

}  // namespace pe::data
