// Runs a few jobs on short-lived named threads and rethrows the first job's error after
// all have finished. The checkpoint pipeline uses it for copy and writer fan-out: a save
// is hundreds of milliseconds, so thread start-up (~20 us) does not matter, and threads
// that exist only while there is work cannot outlive the interpreter.
#pragma once

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pe {

inline void name_this_thread(const std::string& name) {
  // Linux limits thread names to 15 characters.
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
}

// Raises this thread's nice value by `increment` (capped at 19). Best effort: a thread that
// cannot lower its priority still works, only less politely.
inline void lower_this_thread_priority(int increment) {
  errno = 0;
  const pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  int current = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
  if (current == -1 && errno != 0) return;
  setpriority(PRIO_PROCESS, static_cast<id_t>(tid), std::min(19, current + increment));
}

// Calls job(i) for i in [0, n): job 0 on the calling thread, the rest on new threads (or, for
// any thread that cannot be started, on the calling thread after job 0).
inline void parallel_for(size_t n, const std::string& thread_name, const std::function<void(size_t)>& job) {
  if (n == 0) return;
  std::exception_ptr first_error;
  std::mutex mu;
  auto guarded = [&](size_t i) {
    try {
      job(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!first_error) first_error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  std::vector<size_t> on_caller;  // jobs whose thread could not be started
  threads.reserve(n - 1);
  on_caller.reserve(n - 1);  // nothing below may throw while threads are joinable
  for (size_t i = 1; i < n; ++i) {
    try {
      threads.emplace_back([&, i] {
        name_this_thread(thread_name + "-" + std::to_string(i));
        guarded(i);
      });
    } catch (...) {
      // No thread to be had (std::system_error EAGAIN under a process or memory limit, or
      // std::bad_alloc for its state). The job runs here instead: slower, but neither lost
      // nor a std::terminate from the started threads left unjoined.
      on_caller.push_back(i);
    }
  }
  guarded(0);
  for (size_t i : on_caller) guarded(i);
  for (auto& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace pe
