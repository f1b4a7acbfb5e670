// Reusable batch buffers: workers gather samples straight into them and Python hands them
// out as tensors without a copy; a buffer comes back when its last tensor is freed.
//
// The pool never blocks: the bound on batches in flight is the prefetcher's queue depth.
// If the consumer keeps batches (e.g. list(loader)), acquire() allocates more buffers, and
// release() frees buffers beyond `keep_free` instead of hoarding them, so memory follows
// what the consumer holds. External buffers (pinned memory owned by the caller, for fast
// host-to-device copies) are preferred when large enough and are never freed here.
// Concurrency: any thread may acquire/release; a mutex guards the free lists. The pool
// must outlive its leases (leases hold a shared_ptr to it).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace pe::data {

class BatchPool : public std::enable_shared_from_this<BatchPool> {
 public:
  struct Buffer {
    uint8_t* data = nullptr;
    uint64_t capacity = 0;
    bool external = false;
  };

  // Returns a buffer to the pool when destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(std::shared_ptr<BatchPool> pool, Buffer buffer) : pool_(std::move(pool)), buffer_(buffer) {}
    ~Lease() { reset(); }
    Lease(Lease&& o) noexcept : pool_(std::move(o.pool_)), buffer_(o.buffer_) { o.buffer_ = Buffer{}; }
    Lease& operator=(Lease&& o) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    uint8_t* data() const { return buffer_.data; }
    uint64_t capacity() const { return buffer_.capacity; }
    bool external() const { return buffer_.external; }
    void reset();

   private:
    std::shared_ptr<BatchPool> pool_;
    Buffer buffer_;
  };

  explicit BatchPool(size_t keep_free) : keep_free_(keep_free) {}
  ~BatchPool();
  BatchPool(const BatchPool&) = delete;
  BatchPool& operator=(const BatchPool&) = delete;

  Lease acquire(uint64_t bytes);
  // Adds caller-owned memory; the caller keeps it alive as long as the pool and its leases.
  void add_external(uint8_t* data, uint64_t capacity);

  uint64_t allocated_bytes() const;  // pool-owned bytes, free or leased

 private:
  void release(Buffer buffer);

  const size_t keep_free_;
  mutable std::mutex mu_;
  std::vector<Buffer> free_;
  std::vector<Buffer> free_external_;
  uint64_t allocated_ = 0;
};

}  // namespace pe::data
