// StagingPool: page-aligned blocks, reuse (best fit), the memory cap and its back-pressure,
// and an abandoned wait that acquires nothing.
#include "checkpoint/staging_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <thread>
#include <vector>

#include "common/errors.h"

namespace pe {
namespace {

constexpr uint64_t kPage = 4096;

struct WaitInterrupted {};

TEST(StagingPool, BlocksArePageAlignedRoundedUpAndZeroed) {
  StagingPool pool(0);
  StagingPool::Block* b = pool.acquire(5000);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b->data) % kPage, 0u);
  EXPECT_EQ(b->capacity, 2 * kPage);
  EXPECT_TRUE(b->in_use);
  for (uint64_t i = 0; i < b->capacity; ++i) ASSERT_EQ(b->data[i], 0);
  b->data[b->capacity - 1] = 1;  // writable to the last byte
  EXPECT_EQ(pool.allocated_bytes(), 2 * kPage);
  EXPECT_EQ(pool.acquire(0)->capacity, kPage);  // zero bytes still gets a (one-page) block
  pool.release(b);
}

TEST(StagingPool, AReleasedBlockIsReusedNotReallocated) {
  StagingPool pool(0);
  StagingPool::Block* first = pool.acquire(10 * kPage);
  uint8_t* data = first->data;
  pool.release(first);
  EXPECT_FALSE(first->in_use);
  StagingPool::Block* again = pool.acquire(3 * kPage);  // smaller fits in the free block
  EXPECT_EQ(again->data, data);
  EXPECT_EQ(pool.allocated_bytes(), 10 * kPage);
  StagingPool::Block* other = pool.acquire(3 * kPage);  // the free one is taken: a new block
  EXPECT_NE(other->data, data);
  EXPECT_EQ(pool.allocated_bytes(), 13 * kPage);
}

TEST(StagingPool, ReuseTakesTheSmallestFreeBlockThatFits) {
  StagingPool pool(0);
  StagingPool::Block* big = pool.acquire(8 * kPage);
  StagingPool::Block* mid = pool.acquire(4 * kPage);
  StagingPool::Block* small = pool.acquire(1 * kPage);
  pool.release(big);
  pool.release(mid);
  pool.release(small);
  EXPECT_EQ(pool.acquire(2 * kPage), mid);
  EXPECT_EQ(pool.acquire(2 * kPage), big);
  EXPECT_EQ(pool.acquire(1 * kPage), small);
  EXPECT_EQ(pool.allocated_bytes(), 13 * kPage);
}

TEST(StagingPool, ARequestLargerThanTheCapIsRefusedAtOnce) {
  StagingPool pool(4 * kPage);
  EXPECT_THROW(pool.acquire(4 * kPage + 1), InvalidArgument);  // rounds up to 5 pages
  EXPECT_NO_THROW(pool.release(pool.acquire(4 * kPage)));
  EXPECT_EQ(pool.cap_bytes(), 4 * kPage);
}

TEST(StagingPool, AtTheCapAcquireWaitsForARelease) {
  StagingPool pool(4 * kPage);
  StagingPool::Block* held = pool.acquire(3 * kPage);
  std::atomic<bool> acquired{false};
  auto waiter = std::async(std::launch::async, [&] {
    StagingPool::Block* b = pool.acquire(2 * kPage);  // 3 + 2 pages > cap
    acquired = true;
    return b;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(acquired) << "acquire() went past the cap instead of waiting";
  EXPECT_EQ(pool.allocated_bytes(), 3 * kPage);
  pool.release(held);
  StagingPool::Block* b = waiter.get();
  EXPECT_EQ(b, held);  // the released block fits: reused
  EXPECT_LE(pool.allocated_bytes(), pool.cap_bytes());
}

TEST(StagingPool, FreeBlocksTooSmallAreDroppedToMakeRoomUnderTheCap) {
  StagingPool pool(4 * kPage);
  pool.release(pool.acquire(1 * kPage));
  pool.release(pool.acquire(2 * kPage));  // reuses nothing: the 1-page block is too small
  EXPECT_EQ(pool.allocated_bytes(), 3 * kPage);
  StagingPool::Block* b = pool.acquire(4 * kPage);  // only fits once both free blocks go
  EXPECT_EQ(b->capacity, 4 * kPage);
  EXPECT_EQ(pool.allocated_bytes(), 4 * kPage);
}

TEST(StagingPool, AnInterruptedWaitAcquiresNothing) {
  StagingPool pool(2 * kPage);
  StagingPool::Block* held = pool.acquire(2 * kPage);
  int polls = 0;
  Poll poll = [&] {
    if (++polls == 2) throw WaitInterrupted{};
  };
  EXPECT_THROW(pool.acquire(kPage, poll), WaitInterrupted);
  EXPECT_EQ(polls, 2);
  EXPECT_EQ(pool.allocated_bytes(), 2 * kPage);
  pool.release(held);
  // Nothing leaked: the whole cap is available again.
  StagingPool::Block* all = pool.acquire(2 * kPage);
  EXPECT_EQ(all, held);
}

TEST(StagingPool, LeaseReleasesItsBlock) {
  StagingPool pool(kPage);
  uint8_t* data = nullptr;
  {
    StagingLease lease(pool, kPage);
    data = lease.data();
  }
  StagingLease again(pool, kPage);  // would wait forever if the first lease had kept the block
  EXPECT_EQ(again.data(), data);
}

TEST(StagingPool, ConcurrentUsersNeverExceedTheCap) {
  StagingPool pool(6 * kPage);
  std::atomic<bool> over{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        StagingLease lease(pool, static_cast<uint64_t>((t + i) % 3 + 1) * kPage);
        lease.data()[0] = static_cast<uint8_t>(i);
        if (pool.allocated_bytes() > pool.cap_bytes()) over = true;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(over);
  EXPECT_LE(pool.allocated_bytes(), 6 * kPage);
}

}  // namespace
}  // namespace pe
