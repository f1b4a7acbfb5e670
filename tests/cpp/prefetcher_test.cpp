// Prefetcher: batches in the sampler's order whatever the threads do, bounded memory, resume,
// infinite runs, early stop, a worker's error, a consumer's error, and close from another thread.
#include "data/prefetcher.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include "batch_contents.h"
#include "common/errors.h"
#include "dataset_files.h"
#include "temp_dir.h"
#include "thread_limit.h"

namespace pe::data {
namespace {

using namespace std::chrono_literals;
using Status = Prefetcher::Status;

class PrefetcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dataset_ = test::make_index_dataset(tmp_, {5, 7, 9}, /*tokens=*/true);  // 21 samples
    SamplerConfig c;
    c.num_samples = 21;
    c.batch_size = 4;  // 6 batches, the last one of 1 sample
    c.order = Order::kFull;
    c.seed = 3;
    config_ = c;
  }

  std::shared_ptr<const BatchAssembler> assembler(uint64_t cache = 0) {
    return std::make_shared<const BatchAssembler>(dataset_, cache, 4);
  }

  std::vector<uint64_t> expected(uint64_t epoch, uint64_t b) const {
    Sampler s(config_);
    std::vector<uint64_t> out(s.batch_len(b));
    s.batch_indices(epoch, b, out.data());
    return out;
  }

  // Takes every batch until the end, checking each against the sampler.
  size_t drain(Prefetcher& p, uint64_t epoch, uint64_t first) {
    size_t n = 0;
    Batch b;
    while (p.next(&b, 10s) == Status::kBatch) {
      EXPECT_EQ(b.epoch, epoch);
      EXPECT_EQ(b.index, first + n);
      test::expect_batch_holds(b, expected(b.epoch, b.index), true);
      ++n;
    }
    return n;
  }

  test::TempDir tmp_;
  std::shared_ptr<const MmapDataset> dataset_;
  SamplerConfig config_;
};

TEST_F(PrefetcherTest, RefusesBadArguments) {
  EXPECT_THROW(Prefetcher(assembler(), Sampler(config_), 0, 2), InvalidArgument);
  EXPECT_THROW(Prefetcher(assembler(), Sampler(config_), 2, 0), InvalidArgument);
  Prefetcher p(assembler(), Sampler(config_), 2, 2);
  EXPECT_THROW(p.start(0, 7, false), InvalidArgument);  // past the epoch's 6 batches
  SamplerConfig empty = config_;
  empty.num_samples = 0;
  Prefetcher none(assembler(), Sampler(empty), 1, 1);
  EXPECT_THROW(none.start(0, 0, true), InvalidArgument);
  none.start(0, 0, false);
  Batch b;
  EXPECT_EQ(none.next(&b, 1s), Status::kEnd);
}

TEST_F(PrefetcherTest, DeliversTheEpochInOrderForEveryThreadCountAndDepth) {
  for (size_t threads : {1, 2, 5})
    for (size_t depth : {1, 2, 8}) {
      Prefetcher p(assembler(threads == 2 ? 1 << 30 : 0), Sampler(config_), threads, depth);
      EXPECT_FALSE(p.running());
      p.start(4, 0, false);
      EXPECT_TRUE(p.running());
      EXPECT_EQ(drain(p, 4, 0), 6u) << threads << " threads, depth " << depth;
      EXPECT_FALSE(p.running());
      Batch b;
      EXPECT_EQ(p.next(&b, 1s), Status::kEnd);  // and stays ended
    }
}

TEST_F(PrefetcherTest, StartsMidEpochWithTheBatchesItWouldHaveHad) {
  Prefetcher p(assembler(), Sampler(config_), 3, 3);
  p.start(2, 4, false);
  EXPECT_EQ(drain(p, 2, 4), 2u);
  p.start(2, 6, false);  // at the very end: nothing left
  EXPECT_EQ(drain(p, 2, 6), 0u);
}

TEST_F(PrefetcherTest, AnInfiniteRunContinuesIntoTheNextEpochs) {
  Prefetcher p(assembler(), Sampler(config_), 2, 4);
  p.start(1, 5, true);
  Batch b;
  for (uint64_t k = 0; k < 14; ++k) {
    ASSERT_EQ(p.next(&b, 10s), Status::kBatch);
    const uint64_t global = 5 + k;
    EXPECT_EQ(b.epoch, 1 + global / 6);
    EXPECT_EQ(b.index, global % 6);
    test::expect_batch_holds(b, expected(b.epoch, b.index), true);
  }
  EXPECT_TRUE(p.running());
  p.stop();
}

TEST_F(PrefetcherTest, AtMostDepthBatchesAreBuiltAheadOfTheConsumer) {
  auto a = assembler();
  Prefetcher p(a, Sampler(config_), 4, 2);
  p.start(0, 0, true);
  std::this_thread::sleep_for(300ms);  // the workers fill the ring and then wait
  const uint64_t per_batch = 4096;     // every batch of this dataset fits in one page
  EXPECT_LE(a->pool()->allocated_bytes(), 2 * per_batch);
  Batch b;
  ASSERT_EQ(p.next(&b, 10s), Status::kBatch);
  p.stop();
}

TEST_F(PrefetcherTest, StopAfterAFewBatchesEndsTheRunAndReturnsItsBuffers) {
  auto a = assembler();
  Prefetcher p(a, Sampler(config_), 3, 4);
  p.start(0, 0, true);
  Batch kept;
  ASSERT_EQ(p.next(&kept, 10s), Status::kBatch);
  ASSERT_EQ(p.next(&kept, 10s), Status::kBatch);
  p.stop();
  EXPECT_FALSE(p.running());
  p.stop();  // idempotent
  Batch b;
  EXPECT_EQ(p.next(&b, 10ms), Status::kEnd);
  test::expect_batch_holds(kept, expected(0, 1), true);  // a delivered batch outlives the run
  // Undelivered batches went back to the pool: only `kept` is leased, keep_free (4) are free.
  EXPECT_LE(a->pool()->allocated_bytes(), 5u * 4096);
  p.start(3, 0, false);  // and the prefetcher can run again
  EXPECT_EQ(drain(p, 3, 0), 6u);
}

TEST_F(PrefetcherTest, AWorkersErrorArrivesAfterTheBatchesBeforeIt) {
  Prefetcher p(assembler(), Sampler(config_), 3, 4);
  p.inject_failure(3);
  p.start(0, 0, false);
  Batch b;
  for (uint64_t i = 0; i < 3; ++i) {
    ASSERT_EQ(p.next(&b, 10s), Status::kBatch);
    EXPECT_EQ(b.index, i);
  }
  try {
    p.next(&b, 10s);
    ADD_FAILURE() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("batch 3"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(p.running());  // the run stopped with its error
  EXPECT_EQ(p.next(&b, 10ms), Status::kEnd);
}

TEST_F(PrefetcherTest, AConsumersErrorUnwindsThroughThePrefetcherWithoutHanging) {
  auto a = assembler();
  auto run = [&] {
    Prefetcher p(a, Sampler(config_), 4, 8);
    p.inject_delay(20);
    p.start(0, 0, true);
    Batch b;
    for (int i = 0;; ++i) {
      ASSERT_EQ(p.next(&b, 10s), Status::kBatch);
      if (i == 2) throw std::runtime_error("the training step failed");  // destroys p mid-run
    }
  };
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(run(), std::runtime_error);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_LE(a->pool()->allocated_bytes(), 4u * 4096);  // every batch came back
}

TEST_F(PrefetcherTest, StopFromAnotherThreadWakesAConsumerBlockedInNext) {
  Prefetcher p(assembler(), Sampler(config_), 2, 2);
  p.inject_delay(5000);  // no batch will be ready for a long time
  p.start(0, 0, false);
  std::thread closer([&] {
    std::this_thread::sleep_for(200ms);
    p.stop();
  });
  Batch b;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(p.next(&b, 30s), Status::kEnd);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s) << "stop() did not cut the delayed builds short";
  closer.join();
  EXPECT_FALSE(p.running());
}

TEST_F(PrefetcherTest, StopFromAnotherThreadWhileTheConsumerIsBusy) {
  for (int round = 0; round < 20; ++round) {
    Prefetcher p(assembler(), Sampler(config_), 3, 3);
    p.start(0, 0, true);
    std::atomic<bool> stop_now{false};
    std::thread closer([&] {
      while (!stop_now) std::this_thread::yield();
      p.stop();
    });
    Batch b;
    size_t got = 0;
    Status s;
    while ((s = p.next(&b, 10s)) == Status::kBatch) {
      test::expect_batch_holds(b, expected(b.epoch, b.index), true);
      if (++got == static_cast<size_t>(round % 5 + 1)) stop_now = true;
    }
    EXPECT_EQ(s, Status::kEnd);
    closer.join();
  }
}

TEST_F(PrefetcherTest, NextTimesOutWhileABatchIsSlow) {
  Prefetcher p(assembler(), Sampler(config_), 1, 1);
  p.inject_delay(300);
  p.start(0, 0, false);
  Batch b;
  EXPECT_EQ(p.next(&b, 10ms), Status::kTimeout);
  EXPECT_EQ(p.next(&b, 10s), Status::kBatch);
  EXPECT_EQ(b.index, 0u);
}

TEST_F(PrefetcherTest, StartingAgainDropsTheOldRun) {
  Prefetcher p(assembler(), Sampler(config_), 2, 3);
  p.start(0, 0, true);
  Batch b;
  ASSERT_EQ(p.next(&b, 10s), Status::kBatch);
  p.start(9, 2, false);
  EXPECT_EQ(drain(p, 9, 2), 4u);
}

// Exit code of a child that may start only `spare` more threads and runs a 4-worker prefetcher.
int prefetcher_with_spare_threads(size_t spare) {
  if (!test::limit_new_threads_to(spare)) return 5;
  test::TempDir tmp;  // made after the switch of user id, so that user can read it
  SamplerConfig c;
  c.num_samples = 21;
  c.batch_size = 4;
  Prefetcher p(std::make_shared<const BatchAssembler>(test::make_index_dataset(tmp, {21}, true), 0, 2), Sampler(c), 4,
               3);
  try {
    p.start(0, 0, false);
  } catch (const std::system_error&) {
    return spare == 0 && !p.running() ? 0 : 7;  // no worker at all: refused, and stopped
  }
  if (spare == 0) return 8;
  Batch b;
  uint64_t n = 0;
  while (p.next(&b, 10s) == Status::kBatch) {
    if (b.index != n++) return 9;
  }
  return n == 6 ? 0 : 10;
}

// Regression: when a worker thread could not be started, start() threw with the workers
// started before it still running, so the caller saw an error while a run went on behind it.
// Now the run goes on with the workers it got; only with none does start() throw, stopped.
TEST(PrefetcherThreads, ARunStartsWithTheWorkersItCanGet) {
  if (!test::can_limit_threads()) GTEST_SKIP() << "needs root to confine a thread limit to one process";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(_exit(prefetcher_with_spare_threads(1)), ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(_exit(prefetcher_with_spare_threads(0)), ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace pe::data
