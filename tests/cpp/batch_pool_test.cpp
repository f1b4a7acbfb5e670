// BatchPool: buffers come back when their lease ends, at most keep_free are kept, external
// (caller-owned) buffers are preferred and never freed, and leases may outlive the pool's owner.
#include "data/batch_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace pe::data {
namespace {

TEST(BatchPool, BuffersArePageAlignedAndRoundedUp) {
  auto pool = std::make_shared<BatchPool>(2);
  BatchPool::Lease a = pool->acquire(5000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 4096, 0u);
  EXPECT_EQ(a.capacity(), 8192u);
  EXPECT_FALSE(a.external());
  EXPECT_EQ(pool->acquire(0).capacity(), 4096u);
  EXPECT_EQ(pool->allocated_bytes(), 8192u + 4096u);  // the zero-byte lease was kept (keep_free = 2)
}

TEST(BatchPool, AReturnedBufferIsReused) {
  auto pool = std::make_shared<BatchPool>(1);
  uint8_t* data = nullptr;
  {
    BatchPool::Lease a = pool->acquire(10000);
    data = a.data();
  }
  BatchPool::Lease b = pool->acquire(9000);
  EXPECT_EQ(b.data(), data);
  EXPECT_EQ(pool->allocated_bytes(), 12288u);
  BatchPool::Lease c = pool->acquire(20000);  // larger than any free buffer: a new one
  EXPECT_NE(c.data(), data);
}

TEST(BatchPool, KeepsAtMostKeepFreeBuffersAndFreesTheRest) {
  auto pool = std::make_shared<BatchPool>(2);
  {
    std::vector<BatchPool::Lease> held;
    for (int i = 0; i < 5; ++i) held.push_back(pool->acquire(4096));
    EXPECT_EQ(pool->allocated_bytes(), 5u * 4096);
  }
  EXPECT_EQ(pool->allocated_bytes(), 2u * 4096);  // memory follows what the consumer holds
}

TEST(BatchPool, ExternalBuffersArePreferredReusedAndNeverFreed) {
  auto pool = std::make_shared<BatchPool>(0);
  alignas(64) static uint8_t pinned[2][8192];
  pool->add_external(pinned[0], sizeof(pinned[0]));
  pool->add_external(pinned[1], 1024);
  {
    BatchPool::Lease a = pool->acquire(4000);
    EXPECT_TRUE(a.external());
    EXPECT_EQ(a.data(), pinned[0]);            // the 1 KiB one is too small
    BatchPool::Lease b = pool->acquire(4000);  // the fitting external one is leased: pool memory
    EXPECT_FALSE(b.external());
    EXPECT_EQ(pool->allocated_bytes(), 4096u);
  }
  EXPECT_EQ(pool->allocated_bytes(), 0u);  // keep_free = 0 frees pool memory, not external memory
  EXPECT_EQ(pool->acquire(8192).data(), pinned[0]);
}

TEST(BatchPool, MovingALeaseMovesTheBufferAndAssigningReleasesTheOldOne) {
  auto pool = std::make_shared<BatchPool>(4);
  BatchPool::Lease a = pool->acquire(100);
  uint8_t* data = a.data();
  BatchPool::Lease b(std::move(a));
  EXPECT_EQ(b.data(), data);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  BatchPool::Lease c = pool->acquire(100);
  uint8_t* other = c.data();
  c = std::move(b);  // c's old buffer goes back to the pool
  EXPECT_EQ(c.data(), data);
  EXPECT_EQ(pool->acquire(100).data(), other);
  c.reset();
  c.reset();  // idempotent
  EXPECT_EQ(c.data(), nullptr);
}

TEST(BatchPool, ALeaseKeepsThePoolAlive) {
  auto pool = std::make_shared<BatchPool>(1);
  BatchPool::Lease lease = pool->acquire(4096);
  lease.data()[4095] = 1;
  pool.reset();  // the lease's shared_ptr keeps the pool; releasing into it must be safe
  lease.reset();
}

TEST(BatchPool, ConcurrentAcquireAndRelease) {
  auto pool = std::make_shared<BatchPool>(3);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        BatchPool::Lease l = pool->acquire(static_cast<uint64_t>(1 + (i + t) % 3) * 4096);
        l.data()[0] = static_cast<uint8_t>(i);
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_LE(pool->allocated_bytes(), 3u * 3 * 4096);
}

}  // namespace
}  // namespace pe::data
