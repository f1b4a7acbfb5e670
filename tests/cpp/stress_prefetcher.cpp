// Stress: 1,000 prefetcher runs that the consumer leaves early: after a random number of
// batches it stops (itself, from another thread, or by destroying the prefetcher), sometimes
// with a worker error on the way. Meant to run under TSan; every delivered batch is checked.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "batch_contents.h"
#include "common/errors.h"
#include "data/prefetcher.h"
#include "dataset_files.h"
#include "temp_dir.h"

namespace pe::data {
namespace {

using namespace std::chrono_literals;

constexpr int kRuns = 1000;

TEST(Stress, PrefetcherWithEarlyBreaks) {
  test::TempDir tmp;
  auto dataset = test::make_index_dataset(tmp, {13, 1, 20, 6}, /*tokens=*/true);  // 40 samples
  auto assembler = std::make_shared<const BatchAssembler>(dataset, uint64_t{1} << 20, 4);
  SamplerConfig c;
  c.num_samples = 40;
  c.batch_size = 3;
  c.order = Order::kFull;
  const Sampler sampler(c);
  std::mt19937 rng(7);
  int errors_seen = 0, batches_seen = 0;
  for (int run = 0; run < kRuns; ++run) {
    const size_t threads = 1 + rng() % 4, depth = 1 + rng() % 6;
    auto p = std::make_unique<Prefetcher>(assembler, sampler, threads, depth);
    const bool infinite = rng() % 2 == 0;
    const uint64_t epoch = rng() % 5, first = rng() % sampler.num_batches();
    const int64_t fail_at = rng() % 8 == 0 ? static_cast<int64_t>(rng() % sampler.num_batches()) : -1;
    if (fail_at >= 0) p->inject_failure(fail_at);
    p->start(epoch, first, infinite);
    const int take = static_cast<int>(rng() % 12);
    const int how = static_cast<int>(rng() % 3);  // 0: stop(), 1: stop() on another thread, 2: destroy
    std::thread closer;
    Batch b;
    try {
      for (int k = 0; k < take; ++k) {
        Prefetcher::Status s = p->next(&b, 10s);
        ASSERT_NE(s, Prefetcher::Status::kTimeout) << "run " << run;
        if (s == Prefetcher::Status::kEnd) break;
        std::vector<uint64_t> want(sampler.batch_len(b.index));
        sampler.batch_indices(b.epoch, b.index, want.data());
        test::expect_batch_holds(b, want, true);
        ++batches_seen;
        if (how == 1 && k == take / 2 && !closer.joinable()) closer = std::thread([&] { p->stop(); });
      }
    } catch (const DataError&) {
      ++errors_seen;
      EXPECT_GE(fail_at, 0) << "run " << run;
    }
    if (how == 0) p->stop();
    if (closer.joinable()) closer.join();
    p.reset();
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(batches_seen, kRuns);
  EXPECT_GT(errors_seen, 0);
  std::printf("[stress] %d prefetcher runs left early: %d batches checked, %d worker errors delivered\n", kRuns,
              batches_seen, errors_seen);
}

}  // namespace
}  // namespace pe::data
