#include "stalled_memory.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace pe::test {
namespace {

// User-mode-only faults need no privilege (Linux >= 5.11); the copies we stall are user-mode.
int open_userfaultfd() {
#ifdef UFFD_USER_MODE_ONLY
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  if (fd >= 0) return fd;
#endif
  return static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
}

bool handshake(int fd) {
  uffdio_api api{};
  api.api = UFFD_API;
  return ioctl(fd, UFFDIO_API, &api) == 0;
}

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

}  // namespace

bool StalledMemory::available() {
  static const bool kAvailable = [] {
    int fd = open_userfaultfd();
    if (fd < 0) return false;
    bool ok = handshake(fd);
    close(fd);
    return ok;
  }();
  return kAvailable;
}

StalledMemory::StalledMemory(std::vector<uint8_t> contents) : contents_(std::move(contents)) {
  const size_t page = page_size();
  map_bytes_ = std::max<size_t>(page, (contents_.size() + page - 1) / page * page);
  void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    ADD_FAILURE() << "mmap failed: " << std::strerror(errno);
    std::abort();
  }
  base_ = static_cast<uint8_t*>(p);
  uffd_ = open_userfaultfd();
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(base_);
  reg.range.len = map_bytes_;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (uffd_ < 0 || !handshake(uffd_) || ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) {
    ADD_FAILURE() << "userfaultfd unavailable: " << std::strerror(errno) << " (check StalledMemory::available())";
    std::abort();
  }
}

StalledMemory::~StalledMemory() {
  release();
  if (uffd_ >= 0) close(uffd_);
  munmap(base_, map_bytes_);
}

bool StalledMemory::wait_until_touched(std::chrono::milliseconds timeout) {
  if (touched_) return true;
  pollfd pfd{uffd_, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(timeout.count())) <= 0) return false;
  uffd_msg msg{};
  // The event is only a signal here: the faulting thread stays blocked until release().
  touched_ = read(uffd_, &msg, sizeof(msg)) == static_cast<ssize_t>(sizeof(msg)) && msg.event == UFFD_EVENT_PAGEFAULT;
  return touched_;
}

void StalledMemory::release() {
  if (released_) return;
  released_ = true;
  const size_t page = page_size();
  std::vector<uint8_t> staging(page);
  for (size_t at = 0; at < map_bytes_; at += page) {
    std::fill(staging.begin(), staging.end(), 0);
    if (at < contents_.size())
      std::memcpy(staging.data(), contents_.data() + at, std::min(page, contents_.size() - at));
    uffdio_copy copy{};
    copy.dst = reinterpret_cast<uint64_t>(base_ + at);
    copy.src = reinterpret_cast<uint64_t>(staging.data());
    copy.len = page;
    // Wakes the threads blocked on this page; EEXIST: already filled (cannot happen here, as
    // nothing else fills pages, but harmless).
    if (ioctl(uffd_, UFFDIO_COPY, &copy) != 0 && errno != EEXIST)
      ADD_FAILURE() << "UFFDIO_COPY: " << std::strerror(errno);
  }
  uffdio_range range{reinterpret_cast<uint64_t>(base_), map_bytes_};
  ioctl(uffd_, UFFDIO_UNREGISTER, &range);
}

}  // namespace pe::test
