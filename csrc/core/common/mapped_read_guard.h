// Reads of memory-mapped files that survive the file shrinking under them.
//
// A read of a mapped page past the end of a file that was truncated after mmap() raises
// SIGBUS, which kills the process. pread() per sample would avoid it at a syscall per 3 KB
// read (millions a second); instead the reads run inside a guarded region: a process-wide
// SIGBUS handler, and per thread a sigjmp_buf armed around the region. A SIGBUS raised while
// the thread's region is armed jumps back to the region's entry, which throws
// MappedReadFault naming the faulting address; the caller maps the address to its file.
//
// Rules for a region's body (the jump skips destructors and unlock calls):
//  - no lock held, and no object that owns memory constructed inside it and alive at a read
//    of mapped memory; build such things before the region, or throw them (exceptions
//    propagate normally and disarm the region);
//  - regions nest: an inner region catches its own faults (to undo its own work) and
//    rethrows, the outer one sees an exception.
//
// A SIGBUS outside any armed region goes to the handler that was installed before ours
// (Python's faulthandler, a sanitizer's, or the default action), called directly: the process
// dies as it did without this code. If another handler replaces ours later (faulthandler.enable()
// after import), entering a region notices (one sigaction() query) and installs ours again in
// front of it. The one difference from no guard at all: after a SIGBUS outside a region was
// passed on once, a second one takes the default action (ends the process), so that two
// handlers which each call the other can never loop.
//
// Concurrency: any thread; each thread has its own region state.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <type_traits>

namespace pe {

// A guarded read faulted (SIGBUS): the mapped file shrank, or its page could not be read.
class MappedReadFault : public std::runtime_error {
 public:
  explicit MappedReadFault(const void* address)
      : std::runtime_error("SIGBUS reading mapped memory"), address_(address) {}
  const void* address() const { return address_; }

 private:
  const void* address_;
};

namespace detail {
// Runs body(arg) in an armed region; returns nullptr, or the faulting address after a SIGBUS.
const void* run_with_mapped_read_guard(void (*body)(void*), void* arg);
}  // namespace detail

// Runs body(); a SIGBUS raised by this thread inside it becomes MappedReadFault.
template <class Body>
void guard_mapped_reads(Body&& body) {
  using B = std::remove_reference_t<Body>;
  const void* fault = detail::run_with_mapped_read_guard([](void* p) { (*static_cast<B*>(p))(); }, &body);
  if (fault != nullptr) throw MappedReadFault(fault);
}

// Whether this process's SIGBUS handler is ours now (for tests).
bool mapped_read_guard_installed();

}  // namespace pe
