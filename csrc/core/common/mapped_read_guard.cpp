#include "common/mapped_read_guard.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <mutex>

namespace pe {
namespace {

// Plain data (no constructor): the handler may touch it in any thread, and a thread_local
// with a constructor would be initialised lazily, which is not async-signal-safe. Each thread
// touches its own before arming it, so the handler never finds it unallocated.
struct RegionState {
  sigjmp_buf jump;
  volatile sig_atomic_t armed;
  const void* volatile fault_address;
};
thread_local RegionState t_region;

std::mutex g_install_mu;
struct sigaction g_previous;                  // the handler ours stands in front of
std::atomic<bool> g_passed_on_once{false};    // see the header: no handler loops

void restore_default_and_reraise(siginfo_t* info) {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
  // A fault re-executes the faulting instruction on return and faults again, now fatally; a
  // SIGBUS sent by kill() would not recur, so send it again (delivered once we return).
  if (info == nullptr || info->si_code <= 0) raise(SIGBUS);
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  RegionState& r = t_region;
  // si_code > 0: raised by the kernel for this thread's own access; a SIGBUS sent with kill()
  // is no read fault and goes on like any other.
  if (r.armed && info != nullptr && info->si_code > 0) {
    r.armed = 0;
    r.fault_address = info->si_addr;
    siglongjmp(r.jump, 1);
  }
  if (g_passed_on_once.exchange(true)) {
    restore_default_and_reraise(info);
    return;
  }
  const struct sigaction& prev = g_previous;
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction != nullptr) {
      prev.sa_sigaction(sig, info, context);
      return;
    }
  } else if (prev.sa_handler == SIG_IGN) {
    return;
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != nullptr) {
    prev.sa_handler(sig);
    return;
  }
  restore_default_and_reraise(info);
}

bool ours(const struct sigaction& sa) { return (sa.sa_flags & SA_SIGINFO) && sa.sa_sigaction == &on_sigbus; }

// One sigaction() query when ours is in place; installs it (again) when it is not.
void ensure_installed() {
  struct sigaction current {};
  if (sigaction(SIGBUS, nullptr, &current) == 0 && ours(current)) return;
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (sigaction(SIGBUS, nullptr, &current) != 0 || ours(current)) return;
  g_previous = current;
  g_passed_on_once.store(false);
  struct sigaction mine {};
  mine.sa_sigaction = &on_sigbus;
  mine.sa_flags = SA_SIGINFO | SA_ONSTACK;  // ONSTACK: on a thread's alternate stack if it has one
  sigemptyset(&mine.sa_mask);
  sigaction(SIGBUS, &mine, nullptr);
}

}  // namespace

namespace detail {

const void* run_with_mapped_read_guard(void (*body)(void*), void* arg) {
  ensure_installed();
  RegionState& r = t_region;
  // An enclosing region's jump target, put back when this one ends (set before sigsetjmp and
  // never changed after it, so they survive the jump without volatile).
  const bool outer_armed = r.armed != 0;
  sigjmp_buf outer;
  if (outer_armed) std::memcpy(&outer, &r.jump, sizeof(sigjmp_buf));
  auto restore_outer = [&] {
    if (outer_armed) std::memcpy(&r.jump, &outer, sizeof(sigjmp_buf));
    r.armed = outer_armed ? 1 : 0;
  };
  // savemask 0: saving the signal mask is a syscall per region; the fault path unblocks
  // SIGBUS itself (the kernel blocked it for the handler, and the jump skipped the unblock).
  if (sigsetjmp(r.jump, 0) != 0) {
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);
    restore_outer();
    return r.fault_address;
  }
  r.armed = 1;
  try {
    body(arg);
  } catch (...) {
    restore_outer();
    throw;
  }
  restore_outer();
  return nullptr;
}

}  // namespace detail

bool mapped_read_guard_installed() {
  struct sigaction current {};
  return sigaction(SIGBUS, nullptr, &current) == 0 && ours(current);
}

}  // namespace pe
