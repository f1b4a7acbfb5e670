// AsyncCheckpointWriter: the concurrency contract of async_writer.h, checked with saves held
// in flight on purpose (a source in StalledMemory blocks the pipeline mid-copy until released).
#include "checkpoint/async_writer.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "checkpoint_files.h"
#include "common/crc32c.h"
#include "common/errors.h"
#include "common/file_io.h"
#include "stalled_memory.h"
#include "temp_dir.h"
#include "thread_limit.h"

namespace pe {
namespace {

using namespace std::chrono_literals;
using test::StalledMemory;
using test::TestTensor;

struct Interrupted {};
struct TimedOut {};

#define REQUIRE_STALLS() \
  if (!StalledMemory::available()) GTEST_SKIP() << "userfaultfd is not available here: cannot hold a save in flight"

// A poll that throws after `n` calls (about n * kPollSlice of waiting).
Poll interrupt_after(int n, int* calls) {
  return [n, calls] {
    if (++*calls >= n) throw Interrupted{};
  };
}

// Fails the test instead of hanging it when a wait that must end does not.
Poll fail_after(std::chrono::seconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  return [deadline] {
    if (std::chrono::steady_clock::now() > deadline) throw TimedOut{};
  };
}

// A tensor whose bytes sit in stalled memory: a save reading them blocks until release().
struct StalledTensor {
  explicit StalledTensor(TestTensor t) : tensor(std::move(t)), memory(tensor.bytes) {}
  TensorSource source() const { return TensorSource{tensor.spec, memory.data()}; }
  TestTensor tensor;
  StalledMemory memory;
};

template <class E>
E expect_throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e;
  }
  ADD_FAILURE() << "did not throw";
  throw std::runtime_error("did not throw");
}

class Writer : public ::testing::Test {
 protected:
  std::vector<TestTensor> tensors(uint32_t seed, size_t n = 3) {
    std::vector<TestTensor> out;
    for (size_t i = 0; i < n; ++i) out.push_back(test::make_tensor("t" + std::to_string(i), 500 + 100 * i, seed + i));
    return out;
  }
  test::TempDir tmp_;
};

TEST_F(Writer, RefusesBadOptionsAndArgumentsBeforeStartingAnything) {
  WriterOptions none_in_flight;
  none_in_flight.max_in_flight = 0;
  EXPECT_THROW(AsyncCheckpointWriter{none_in_flight}, InvalidArgument);
  WriterOptions no_shards;
  no_shards.max_shards = 0;
  EXPECT_THROW(AsyncCheckpointWriter{no_shards}, InvalidArgument);

  AsyncCheckpointWriter w(WriterOptions{});
  auto t = tensors(1);
  EXPECT_THROW(w.save(1, test::sources_of(t), "", 3, ""), InvalidArgument);
  auto bad = test::sources_of(t);
  bad[1].spec.dtype = "F33";
  const std::string dir = tmp_.make_subdir("p");
  EXPECT_THROW(w.save(1, bad, "", 3, dir), InvalidArgument);
  EXPECT_TRUE(list_directory(dir).empty());
  // Neither refusal held the only in-flight slot.
  w.wait(w.save(2, test::sources_of(t), "", 3, dir), fail_after(10s));
  test::expect_complete_part(dir, t, 4, 2);
  EXPECT_THROW(w.stats(12345), InvalidArgument);
  EXPECT_TRUE(w.snapshot_done(12345));  // unknown: long finished and forgotten
}

TEST_F(Writer, ABlockingSaveHasItsSnapshotDoneOnReturnAndWritesACompletePart) {
  AsyncCheckpointWriter w(WriterOptions{});
  auto t = tensors(2);
  const std::string dir = tmp_.make_subdir("p");
  uint64_t id = w.save(42, test::sources_of(t), "{\"epoch\":3}", t.size(), dir);
  EXPECT_TRUE(w.snapshot_done(id));
  EXPECT_TRUE(w.stats(id).snapshot_done);
  for (TestTensor& x : t) x.bytes.assign(x.bytes.size(), 0xEE);  // the caller may reuse its buffers at once
  w.wait(id);
  SaveStats s = w.stats(id);
  EXPECT_TRUE(s.done);
  EXPECT_FALSE(s.failed);
  EXPECT_EQ(s.step, 42u);
  EXPECT_EQ(s.path, dir);
  EXPECT_EQ(s.bytes, 500u * 4 + 600 * 4 + 700 * 4);
  EXPECT_GE(s.persist_seconds, s.snapshot_seconds);
  test::expect_complete_part(dir, tensors(2), 4, 42);
  EXPECT_NE(test::checked_manifest(dir).find("\"state\":{\"epoch\":3}}"), std::string::npos);
}

TEST_F(Writer, AnEmptyStateIsWrittenAsNull) {
  AsyncCheckpointWriter w(WriterOptions{});
  auto t = tensors(3, 1);
  const std::string dir = tmp_.make_subdir("p");
  w.wait(w.save(1, test::sources_of(t), "", 1, dir));
  EXPECT_NE(test::checked_manifest(dir).find("\"state\":null}"), std::string::npos);
}

TEST_F(Writer, AnOverlappedSaveReadsItsSourcesUntilTheSnapshotIsDone) {
  REQUIRE_STALLS();
  AsyncCheckpointWriter w(WriterOptions{});
  auto t = tensors(4);
  StalledTensor late(t[2]);
  std::vector<TensorSource> sources = test::sources_of(t);
  sources[2] = late.source();
  const std::string dir = tmp_.make_subdir("p");
  uint64_t id = w.save(5, sources, "", 1, dir);  // t0 copied now, t1 and t2 in the background
  ASSERT_TRUE(late.memory.wait_until_touched(10s));
  EXPECT_FALSE(w.snapshot_done(id));
  EXPECT_FALSE(w.stats(id).snapshot_done);
  int calls = 0;
  EXPECT_THROW(w.wait_snapshot(id, interrupt_after(2, &calls)), Interrupted);
  calls = 0;
  EXPECT_THROW(w.wait(id, interrupt_after(2, &calls)), Interrupted);
  late.memory.release();
  w.wait_snapshot(id, fail_after(10s));
  EXPECT_TRUE(w.snapshot_done(id));
  w.wait(id, fail_after(10s));  // the interrupted waits did not stop the save
  test::expect_complete_part(dir, t, 4, 5);
}

TEST_F(Writer, ThreeSavesInFlightAndTheFourthWaitsForASlot) {
  REQUIRE_STALLS();
  WriterOptions options;
  options.max_in_flight = 3;
  AsyncCheckpointWriter w(options);
  std::vector<std::vector<TestTensor>> saved;
  std::vector<std::unique_ptr<StalledTensor>> stalls;
  std::vector<uint64_t> ids;
  for (uint32_t i = 0; i < 3; ++i) {
    saved.push_back(tensors(10 * i));
    stalls.push_back(std::make_unique<StalledTensor>(saved.back()[0]));
    auto sources = test::sources_of(saved.back());
    sources[0] = stalls.back()->source();
    ids.push_back(w.save(i, sources, "", 0, tmp_.make_subdir("p" + std::to_string(i)), fail_after(10s)));
  }
  for (auto& s : stalls) ASSERT_TRUE(s->memory.wait_until_touched(10s));  // three pipelines running at once
  for (uint64_t id : ids) EXPECT_FALSE(w.stats(id).done);

  // The fourth save waits for a slot; abandoning the wait takes nothing and starts nothing.
  saved.push_back(tensors(99));
  const std::string fourth = tmp_.make_subdir("p3");
  int calls = 0;
  EXPECT_THROW(w.save(3, test::sources_of(saved[3]), "", 3, fourth, interrupt_after(3, &calls)), Interrupted);
  EXPECT_EQ(calls, 3);
  EXPECT_TRUE(list_directory(fourth).empty());

  stalls[1]->memory.release();  // frees exactly one slot
  w.wait(ids[1], fail_after(10s));
  ids.push_back(w.save(3, test::sources_of(saved[3]), "", 3, fourth, fail_after(10s)));
  w.wait(ids[3], fail_after(10s));
  EXPECT_FALSE(w.stats(ids[0]).done);
  for (auto& s : stalls) s->memory.release();
  w.wait_all(fail_after(10s));
  for (size_t i = 0; i < 4; ++i) test::expect_complete_part(tmp_.file("p" + std::to_string(i)), saved[i], 4, i);
}

TEST_F(Writer, ANonEmptyDirectoryFailsTheSaveAndKeepsWhatWasThere) {
  AsyncCheckpointWriter w(WriterOptions{});
  const std::string dir = tmp_.make_subdir("p");
  test::write_file(dir + "/shard-00000-of-00003.safetensors", "earlier");
  auto t = tensors(5);
  uint64_t id = w.save(1, test::sources_of(t), "", 3, dir);
  IoError e = expect_throws<IoError>([&] { w.wait(id); });
  EXPECT_EQ(e.error_number(), ENOTEMPTY);
  EXPECT_EQ(e.path(), dir);
  EXPECT_NE(std::string(e.what()).find("shard-00000-of-00003.safetensors"), std::string::npos) << e.what();
  EXPECT_TRUE(w.stats(id).failed);
  EXPECT_EQ(test::read_file(dir + "/shard-00000-of-00003.safetensors"), "earlier");
  EXPECT_EQ(list_directory(dir).size(), 1u);
  // Reported once: neither a second wait nor wait_all() rethrows it.
  EXPECT_NO_THROW(w.wait(id));
  EXPECT_NO_THROW(w.wait_all());
}

TEST_F(Writer, AnUnwaitedErrorIsRethrownByTheNextSaveWhichStartsNothing) {
  AsyncCheckpointWriter w(WriterOptions{});
  auto t = tensors(6);
  uint64_t failed = w.save(1, test::sources_of(t), "", 3, tmp_.file("missing"));
  while (!w.stats(failed).done) std::this_thread::sleep_for(1ms);
  const std::string next = tmp_.make_subdir("next");
  IoError e = expect_throws<IoError>([&] { w.save(2, test::sources_of(t), "", 3, next); });
  EXPECT_EQ(e.error_number(), ENOENT);
  EXPECT_EQ(e.path(), tmp_.file("missing"));
  EXPECT_TRUE(list_directory(next).empty());
  EXPECT_FALSE(test::path_exists(tmp_.file("missing")));  // a failed save never creates its directory
  EXPECT_NO_THROW(w.wait(failed));                        // already reported
  w.wait(w.save(3, test::sources_of(t), "", 3, next), fail_after(10s));
  test::expect_complete_part(next, t, 4, 3);
}

TEST_F(Writer, AnUnwaitedErrorIsRethrownByWaitAll) {
  AsyncCheckpointWriter w(WriterOptions{});
  auto t = tensors(7);
  uint64_t failed = w.save(1, test::sources_of(t), "", 0, tmp_.file("missing"));
  EXPECT_THROW(w.wait_all(fail_after(10s)), IoError);
  EXPECT_NO_THROW(w.wait_all());
  EXPECT_NO_THROW(w.wait(failed));
}

// Files may grow only to this size while it lives; writes past it fail with EFBIG (root too).
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    getrlimit(RLIMIT_FSIZE, &saved_);
    old_handler_ = signal(SIGXFSZ, SIG_IGN);  // else the process is killed instead of write() failing
    rlimit limit = saved_;
    limit.rlim_cur = bytes;
    EXPECT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &saved_);
    signal(SIGXFSZ, old_handler_);
  }

 private:
  rlimit saved_{};
  sighandler_t old_handler_;
};

TEST_F(Writer, AWriteErrorOnAWriterThreadFailsTheSaveAndRemovesItsFiles) {
  WriterOptions options;
  options.max_shards = 3;  // three writer threads; the big tensor's shard fails
  AsyncCheckpointWriter w(options);
  std::vector<TestTensor> t{test::make_tensor("big", 64 * 1024, 1), test::make_tensor("a", 100, 2),
                            test::make_tensor("b", 100, 3)};
  const std::string dir = tmp_.make_subdir("p");
  uint64_t id = 0;
  {
    FileSizeLimit limit(128 * 1024);  // the 256 KiB shard cannot be written, the small ones can
    id = w.save(1, test::sources_of(t), "", 3, dir);
    while (!w.stats(id).done) std::this_thread::sleep_for(1ms);
  }
  IoError e = expect_throws<IoError>([&] { w.wait(id); });
  EXPECT_EQ(e.error_number(), EFBIG) << e.what();
  EXPECT_EQ(e.path(), dir + "/shard-00000-of-00003.safetensors");
  EXPECT_TRUE(test::path_exists(dir));  // the directory stays: it is the caller's
  EXPECT_TRUE(list_directory(dir).empty()) << "a failed save left files behind";
  // The writer is still usable.
  const std::string again = tmp_.make_subdir("again");
  w.wait(w.save(2, test::sources_of(t), "", 3, again), fail_after(10s));
  test::expect_complete_part(again, t, 3, 2);
}

TEST_F(Writer, DestructionWaitsForTheSaveInFlight) {
  REQUIRE_STALLS();
  auto w = std::make_unique<AsyncCheckpointWriter>(WriterOptions{});
  auto t = tensors(8);
  StalledTensor stalled(t[1]);
  auto sources = test::sources_of(t);
  sources[1] = stalled.source();
  const std::string dir = tmp_.make_subdir("p");
  w->save(9, sources, "", 0, dir);
  ASSERT_TRUE(stalled.memory.wait_until_touched(10s));
  std::atomic<bool> destroyed{false};
  std::thread destroyer([&] {
    w.reset();
    destroyed = true;
  });
  std::this_thread::sleep_for(300ms);
  EXPECT_FALSE(destroyed) << "the destructor returned while its save was still reading sources";
  EXPECT_TRUE(list_directory(dir).empty());
  stalled.memory.release();
  destroyer.join();
  EXPECT_TRUE(destroyed);
  test::expect_complete_part(dir, t, 4, 9);  // finished, not abandoned
}

TEST_F(Writer, AnInterruptedStagingWaitGivesItsSlotBack) {
  REQUIRE_STALLS();
  auto t = tensors(9, 1);
  WriterOptions options;
  options.max_in_flight = 2;
  options.staging_cap_bytes = 4096;  // room for one save's staging at a time
  AsyncCheckpointWriter w(options);
  StalledTensor stalled(t[0]);
  uint64_t first = w.save(1, {stalled.source()}, "", 0, tmp_.make_subdir("p1"));
  ASSERT_TRUE(stalled.memory.wait_until_touched(10s));
  const std::string second = tmp_.make_subdir("p2");
  int calls = 0;
  // A slot is free, staging is not: the save waits in the pool, then is abandoned.
  EXPECT_THROW(w.save(2, test::sources_of(t), "", 1, second, interrupt_after(2, &calls)), Interrupted);
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(list_directory(second).empty());
  stalled.memory.release();
  w.wait(first, fail_after(10s));
  // wait_all() returns only when no slot is held: an abandoned save that kept one would hang it.
  w.wait_all(fail_after(10s));
  w.wait(w.save(3, test::sources_of(t), "", 1, second, fail_after(10s)), fail_after(10s));
  test::expect_complete_part(second, t, 4, 3);
}

TEST_F(Writer, ReserveAllocatesTheStagingALaterSaveReuses) {
  AsyncCheckpointWriter w(WriterOptions{});
  auto t = tensors(10);
  uint64_t reserved = w.reserve(test::specs_of(t));
  EXPECT_GT(reserved, 0u);
  EXPECT_EQ(w.staging_bytes(), reserved);
  const std::string dir = tmp_.make_subdir("p");
  w.wait(w.save(1, test::sources_of(t), "", 3, dir));
  EXPECT_EQ(w.staging_bytes(), reserved);
  EXPECT_THROW(w.reserve({TensorSpec{"x", "F32", {3}, 5}}), InvalidArgument);
}

TEST_F(Writer, OldFinishedSavesAreForgottenAndJoined) {
  // The writer keeps the last 1024 saves for stats(); older finished ones are joined and dropped
  // by a later save(), under the writer's lock.
  AsyncCheckpointWriter w(WriterOptions{});
  std::vector<TestTensor> t{test::make_tensor("w", 1, 11)};
  std::vector<uint64_t> ids;
  for (int i = 0; i < 1030; ++i) {
    const std::string dir = tmp_.make_subdir("p" + std::to_string(i));
    ids.push_back(w.save(static_cast<uint64_t>(i), test::sources_of(t), "", 1, dir));
    if (i > 0) remove_tree_quietly(tmp_.file("p" + std::to_string(i - 1)));  // finished: a slot was free
  }
  w.wait_all(fail_after(30s));
  EXPECT_THROW(w.stats(ids.front()), InvalidArgument);  // forgotten
  EXPECT_TRUE(w.snapshot_done(ids.front()));
  EXPECT_NO_THROW(w.wait(ids.front()));
  EXPECT_TRUE(w.stats(ids.back()).done);
  test::expect_complete_part(tmp_.file("p1029"), t, 4, 1029);
}

// Exit code of a child that may not start any thread and saves twice.
int save_without_threads() {
  if (!test::limit_new_threads_to(0)) return 5;
  test::TempDir tmp;  // made after the switch of user id, so that user can write it
  std::vector<TestTensor> t{test::make_tensor("w", 10, 1)};
  AsyncCheckpointWriter w(WriterOptions{});
  for (int attempt = 0; attempt < 2; ++attempt) {  // the second would wait forever on a leaked slot
    try {
      w.save(1, test::sources_of(t), "", 1, tmp.make_subdir("p" + std::to_string(attempt)), fail_after(5s));
      return 6;
    } catch (const std::system_error&) {
    } catch (const TimedOut&) {
      return 7;
    }
  }
  w.wait_all(fail_after(5s));
  return w.staging_bytes() > 0 && list_directory(tmp.file("p0")).empty() ? 0 : 8;
}

// A save whose pipeline thread cannot be started throws and holds nothing: no slot, no listed
// save for the destructor to wait on, no file.
TEST(WriterThreads, ASaveWhoseThreadCannotStartThrowsAndHoldsNothing) {
  if (!test::can_limit_threads()) GTEST_SKIP() << "needs root to confine a thread limit to one process";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(_exit(save_without_threads()), ::testing::ExitedWithCode(0), "");
}

TEST(CopyIntoStaging, ParallelCopySplitsTensorsAcrossThreadsAndKeepsEachTensorsChecksum) {
  // Over the 8 MiB threshold, so three threads split the bytes evenly, cutting tensors apart.
  std::vector<TestTensor> t{test::make_tensor("a", 1, 1), test::make_tensor("b", (3 << 20) / 4 + 5, 2),
                            test::make_tensor("empty", 0, 3), test::make_tensor("c", (6 << 20) / 4 + 1, 4),
                            test::make_tensor("d", 7, 5)};
  CheckpointLayout layout = plan_layout(test::specs_of(t), 2);
  std::vector<uint8_t> staging(layout.staging_bytes, 0);
  std::vector<uint32_t> crcs(t.size(), 0xFFFFFFFFu);
  const auto sources = test::sources_of(t);
  copy_into_staging(layout, sources, 0, 2, staging.data(), 3, crcs.data());
  copy_into_staging(layout, sources, 2, t.size(), staging.data(), 3, crcs.data());
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_EQ(crcs[i], crc32c(t[i].bytes.data(), t[i].bytes.size())) << t[i].spec.name;
    ASSERT_TRUE(std::equal(t[i].bytes.begin(), t[i].bytes.end(),
                           staging.begin() + static_cast<long>(layout.tensors[i].staging_offset)))
        << t[i].spec.name;
  }
}

}  // namespace
}  // namespace pe
