#include "checkpoint/staging_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "common/errors.h"
#include "common/parallel.h"

namespace pe {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kTouchSliceBytes = uint64_t{64} << 20;

uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

}  // namespace

StagingPool::StagingPool(uint64_t cap_bytes) : cap_bytes_(cap_bytes) {}

StagingPool::~StagingPool() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& b : blocks_) munmap(b->data, b->capacity);
}

StagingPool::Block* StagingPool::acquire(uint64_t bytes, const Poll& poll) {
  bytes = round_up(std::max<uint64_t>(bytes, 1), kPage);
  if (cap_bytes_ != 0 && bytes > cap_bytes_) {
    throw InvalidArgument("checkpoint needs " + std::to_string(bytes) + " bytes of staging memory but the cap is " +
                          std::to_string(cap_bytes_) + "; raise staging_cap_bytes");
  }
  std::unique_lock<std::mutex> lock(mu_);
  Block* block = nullptr;
  wait_polling(released_, lock, [&] { return (block = try_acquire_locked(bytes)) != nullptr; }, poll);
  return block;
}

// A block of at least `bytes` marked in use, or nullptr while the cap leaves no room for one.
StagingPool::Block* StagingPool::try_acquire_locked(uint64_t bytes) {
  // Best fit among free blocks: the smallest that is large enough.
  Block* best = nullptr;
  for (auto& b : blocks_)
    if (!b->in_use && b->capacity >= bytes && (best == nullptr || b->capacity < best->capacity)) best = b.get();
  if (best != nullptr) {
    best->in_use = true;
    return best;
  }
  // Free blocks that are too small are dropped to make room for one that fits.
  if (cap_bytes_ != 0 && allocated_ + bytes > cap_bytes_) {
    for (size_t i = 0; i < blocks_.size();) {
      if (!blocks_[i]->in_use) {
        free_block_locked(blocks_[i].get());
        blocks_.erase(blocks_.begin() + static_cast<long>(i));
      } else {
        ++i;
      }
    }
  }
  if (cap_bytes_ != 0 && allocated_ + bytes > cap_bytes_) return nullptr;
  Block* b = allocate_locked(bytes);
  b->in_use = true;
  return b;
}

void StagingPool::release(Block* block) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    block->in_use = false;
  }
  released_.notify_all();
}

uint64_t StagingPool::allocated_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return allocated_;
}

StagingPool::Block* StagingPool::allocate_locked(uint64_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw_errno("<staging memory>", "cannot allocate " + std::to_string(bytes) + " bytes");
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);  // fewer TLB misses in the copy; harmless if refused
#endif
  // Touch every page now, in parallel, so no save pays the page faults.
  auto* base = static_cast<uint8_t*>(p);
  size_t slices = static_cast<size_t>((bytes + kTouchSliceBytes - 1) / kTouchSliceBytes);
  size_t threads = std::min<size_t>(slices, std::max(1u, std::thread::hardware_concurrency()));
  parallel_for(threads, "pe-stage-touch", [&](size_t t) {
    for (size_t s = t; s < slices; s += threads) {
      uint64_t begin = s * kTouchSliceBytes;
      std::memset(base + begin, 0, std::min(kTouchSliceBytes, bytes - begin));
    }
  });
  auto block = std::make_unique<Block>();
  block->data = base;
  block->capacity = bytes;
  allocated_ += bytes;
  blocks_.push_back(std::move(block));
  return blocks_.back().get();
}

void StagingPool::free_block_locked(Block* block) {
  munmap(block->data, block->capacity);
  allocated_ -= block->capacity;
}

}  // namespace pe
