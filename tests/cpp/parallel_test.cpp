// parallel_for (common/parallel.h): every job runs once, job 0 on the caller, the others on
// named threads; the first error is rethrown after all jobs finished; and jobs whose thread
// cannot be started still run.
#include "common/parallel.h"

#include <gtest/gtest.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "thread_limit.h"

namespace pe {
namespace {

std::string this_thread_name() {
  char buf[16] = {};
  pthread_getname_np(pthread_self(), buf, sizeof(buf));
  return buf;
}

TEST(ParallelFor, RunsEveryJobOnceJobZeroOnTheCallerTheRestOnNamedThreads) {
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<std::atomic<int>> runs(5);
  std::vector<std::string> names(5);
  std::vector<int> on_caller(5);  // not vector<bool>: its bits share words across threads
  parallel_for(5, "pe-test", [&](size_t i) {
    ++runs[i];
    names[i] = this_thread_name();
    on_caller[i] = std::this_thread::get_id() == caller;
  });
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(runs[i], 1) << i;
  EXPECT_TRUE(on_caller[0]);
  for (size_t i = 1; i < 5; ++i) {
    EXPECT_FALSE(on_caller[i]) << i;
    EXPECT_EQ(names[i], "pe-test-" + std::to_string(i));
  }
  parallel_for(0, "pe-test", [&](size_t) { ADD_FAILURE() << "no job expected"; });
}

TEST(ParallelFor, RethrowsTheFirstErrorAfterEveryJobFinished) {
  std::atomic<int> finished{0};
  try {
    parallel_for(4, "pe-test", [&](size_t i) {
      if (i == 2) throw std::runtime_error("job 2 failed");
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      ++finished;
    });
    ADD_FAILURE() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "job 2 failed");
  }
  EXPECT_EQ(finished, 3);  // the others were not abandoned
}

// Exit code of a child that may start only `spare` more threads and runs four jobs.
int parallel_for_with_spare_threads(size_t spare) {
  if (!test::limit_new_threads_to(spare)) return 5;
  std::atomic<int> ran{0};
  parallel_for(4, "pe-test", [&](size_t) { ++ran; });
  return ran == 4 ? 0 : 6;
}

// Regression: when a thread could not be started (EAGAIN under a process or memory limit),
// std::thread's exception left parallel_for with earlier threads still joinable, whose
// destruction called std::terminate (the process died mid-save), or, when no thread had
// started, the jobs were lost and a save failed that could have run on the caller.
TEST(ParallelFor, JobsWhoseThreadCannotStartRunOnTheCaller) {
  if (!test::can_limit_threads()) GTEST_SKIP() << "needs root to confine a thread limit to one process";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(_exit(parallel_for_with_spare_threads(0)), ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(_exit(parallel_for_with_spare_threads(1)), ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace pe
