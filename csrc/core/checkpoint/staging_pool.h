// Reusable, page-aligned host buffers that checkpoint snapshots are copied into.
//
// A fresh allocation of a few hundred MB costs more in first-touch page faults than the
// copy itself, so blocks are allocated and touched once, then reused by later saves.
// Concurrency: any thread may acquire/release. acquire() blocks while the memory cap is
// reached and every block is in use (back-pressure), so memory never grows without bound;
// its poll (see common/interruptible_wait.h) may abandon that wait, acquiring nothing.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/interruptible_wait.h"

namespace pe {

class StagingPool {
 public:
  struct Block {
    uint8_t* data = nullptr;
    uint64_t capacity = 0;
    bool in_use = false;
  };

  // cap_bytes == 0 means no cap.
  explicit StagingPool(uint64_t cap_bytes);
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // Returns a block of at least `bytes`, reusing a free one when possible. Throws
  // InvalidArgument when `bytes` exceeds the cap (it could never be satisfied).
  Block* acquire(uint64_t bytes, const Poll& poll = Poll());
  void release(Block* block);

  uint64_t allocated_bytes() const;
  uint64_t cap_bytes() const { return cap_bytes_; }

 private:
  Block* try_acquire_locked(uint64_t bytes);
  Block* allocate_locked(uint64_t bytes);
  void free_block_locked(Block* block);

  const uint64_t cap_bytes_;
  mutable std::mutex mu_;
  std::condition_variable released_;
  std::vector<std::unique_ptr<Block>> blocks_;
  uint64_t allocated_ = 0;
};

// RAII lease of a staging block.
class StagingLease {
 public:
  StagingLease(StagingPool& pool, uint64_t bytes, const Poll& poll = Poll())
      : pool_(&pool), block_(pool.acquire(bytes, poll)) {}
  ~StagingLease() {
    if (block_ != nullptr) pool_->release(block_);
  }
  StagingLease(const StagingLease&) = delete;
  StagingLease& operator=(const StagingLease&) = delete;
  uint8_t* data() const { return block_->data; }

 private:
  StagingPool* pool_;
  StagingPool::Block* block_;
};

}  // namespace pe
