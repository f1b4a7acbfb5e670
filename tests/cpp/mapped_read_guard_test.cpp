// The SIGBUS guard (common/mapped_read_guard.h) on a real file truncated under its mapping: a
// fault inside a region becomes MappedReadFault at the faulting address, regions nest, every
// thread has its own, and a fault outside any region still goes to the handler that was there
// before (or kills the process), as it would without the guard.
// Runs under every sanitizer: TSan and ASan deliver a synchronous SIGBUS at once and model
// siglongjmp, so the jump out of the handler is seen as it happens.
#include "common/mapped_read_guard.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "temp_dir.h"

namespace pe {
namespace {

// A file of `pages` pages, mapped whole, then cut to its first page: reads past it fault.
class TruncatedMapping {
 public:
  TruncatedMapping(const test::TempDir& dir, size_t pages) : bytes_(pages * page()) {
    const std::string path = dir.file("mapped.bin");
    test::write_file(path, std::string(bytes_, 'x'));
    int fd = ::open(path.c_str(), O_RDWR);
    EXPECT_GE(fd, 0);
    map_ = static_cast<uint8_t*>(::mmap(nullptr, bytes_, PROT_READ, MAP_SHARED, fd, 0));
    EXPECT_NE(map_, MAP_FAILED);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(page())), 0);
    ::close(fd);
  }
  ~TruncatedMapping() { ::munmap(map_, bytes_); }
  static size_t page() { return static_cast<size_t>(::sysconf(_SC_PAGESIZE)); }
  const uint8_t* good() const { return map_; }
  const uint8_t* gone(size_t page_index = 1) const { return map_ + page_index * page(); }

 private:
  size_t bytes_;
  uint8_t* map_;
};

uint8_t read_byte(const uint8_t* p) { return *static_cast<const volatile uint8_t*>(p); }

TEST(MappedReadGuard, AFaultInsideARegionThrowsWithTheAddressAndTheNextRegionStillWorks) {
  test::TempDir tmp;
  TruncatedMapping m(tmp, 4);
  for (int round = 0; round < 3; ++round) {  // SIGBUS is unblocked again after each jump
    uint8_t first = 0;
    try {
      guard_mapped_reads([&] {
        first = read_byte(m.good());
        read_byte(m.gone(1 + round % 3));
      });
      FAIL() << "the read past the end did not fault";
    } catch (const MappedReadFault& fault) {
      EXPECT_EQ(fault.address(), m.gone(1 + round % 3));
    }
    EXPECT_EQ(first, 'x');
  }
  EXPECT_TRUE(mapped_read_guard_installed());
}

TEST(MappedReadGuard, RegionsNestAndABodysOwnExceptionPassesThrough) {
  test::TempDir tmp;
  TruncatedMapping m(tmp, 3);
  int inner_faults = 0;
  try {
    guard_mapped_reads([&] {
      try {
        guard_mapped_reads([&] { read_byte(m.gone(1)); });
      } catch (const MappedReadFault&) {
        ++inner_faults;
      }
      read_byte(m.gone(2));  // the outer region is armed again after the inner one ended
    });
    FAIL() << "the outer read did not fault";
  } catch (const MappedReadFault& fault) {
    EXPECT_EQ(fault.address(), m.gone(2));
  }
  EXPECT_EQ(inner_faults, 1);
  EXPECT_THROW(guard_mapped_reads([] { throw std::runtime_error("the body's own"); }), std::runtime_error);
}

TEST(MappedReadGuard, EveryThreadHasItsOwnRegion) {
  test::TempDir tmp;
  TruncatedMapping m(tmp, 2);
  std::atomic<int> caught{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        try {
          guard_mapped_reads([&] { read_byte(i % 2 ? m.gone() : m.good()); });
        } catch (const MappedReadFault&) {
          caught.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(caught.load(), 4 * 100);
}

TEST(MappedReadGuardDeathTest, AFaultOutsideAnyRegionStillKillsTheProcess) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  test::TempDir tmp;
  EXPECT_DEATH(
      {
        TruncatedMapping m(tmp, 2);
        guard_mapped_reads([&] { read_byte(m.good()); });  // installs the handler
        read_byte(m.gone());
      },
      "");
}

void exit_42(int, siginfo_t*, void*) { _exit(42); }

TEST(MappedReadGuardDeathTest, AFaultOutsideAnyRegionGoesToTheHandlerInstalledBefore) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  test::TempDir tmp;
  EXPECT_EXIT(
      {
        struct sigaction before {};
        before.sa_sigaction = &exit_42;
        before.sa_flags = SA_SIGINFO;
        sigemptyset(&before.sa_mask);
        sigaction(SIGBUS, &before, nullptr);
        TruncatedMapping m(tmp, 2);
        guard_mapped_reads([&] { read_byte(m.good()); });
        read_byte(m.gone());
      },
      ::testing::ExitedWithCode(42), "");
}

TEST(MappedReadGuardDeathTest, AHandlerInstalledLaterIsPutBehindOursAtTheNextRegion) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  test::TempDir tmp;
  EXPECT_EXIT(
      {
        TruncatedMapping m(tmp, 2);
        guard_mapped_reads([&] { read_byte(m.good()); });
        struct sigaction later {};  // like faulthandler.enable() after import
        later.sa_sigaction = &exit_42;
        later.sa_flags = SA_SIGINFO;
        sigemptyset(&later.sa_mask);
        sigaction(SIGBUS, &later, nullptr);
        bool caught = false;
        try {
          guard_mapped_reads([&] { read_byte(m.gone()); });
        } catch (const MappedReadFault&) {
          caught = true;
        }
        if (!caught || !mapped_read_guard_installed()) _exit(1);
        read_byte(m.gone());  // outside: the later handler still gets it
      },
      ::testing::ExitedWithCode(42), "");
}

}  // namespace
}  // namespace pe
