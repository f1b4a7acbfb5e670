// Memory whose first read blocks until the test says so: a source buffer that stalls a
// checkpoint pipeline mid-copy, deterministically, so a test can act while a save is
// certainly in flight (a slow disk or a big tensor only makes that likely).
//
// Built on userfaultfd: the pages start missing, a thread touching one sleeps in the kernel
// (invisible to the sanitizers, which see a plain read), and release() fills every page with
// the contents and wakes it. Only one test thread calls the methods.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pe::test {

class StalledMemory {
 public:
  // Whether this kernel lets us register userfaultfd ranges; tests that need a stall skip
  // (saying why) where it does not.
  static bool available();

  // `contents.size()` bytes (rounded up to whole pages for the mapping).
  explicit StalledMemory(std::vector<uint8_t> contents);
  ~StalledMemory();  // releases first, so no thread stays blocked
  StalledMemory(const StalledMemory&) = delete;
  StalledMemory& operator=(const StalledMemory&) = delete;

  const uint8_t* data() const { return base_; }
  size_t size() const { return contents_.size(); }
  // Waits until some thread has blocked on a read; false on timeout.
  bool wait_until_touched(std::chrono::milliseconds timeout);
  // Fills every page with the contents and wakes every blocked reader. Idempotent.
  void release();

 private:
  std::vector<uint8_t> contents_;
  size_t map_bytes_ = 0;
  uint8_t* base_ = nullptr;
  int uffd_ = -1;
  bool released_ = false;
  bool touched_ = false;
};

}  // namespace pe::test
