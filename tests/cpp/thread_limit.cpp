#include "thread_limit.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace pe::test {
namespace {

size_t threads_of_this_process() {
  std::ifstream status("/proc/self/status");
  std::string key;
  size_t n = 0;
  while (status >> key)
    if (key == "Threads:" && status >> n) return n;
  return 0;
}

}  // namespace

bool can_limit_threads() { return geteuid() == 0; }

bool limit_new_threads_to(size_t spare) {
  if (!can_limit_threads() || setuid(static_cast<uid_t>(200000 + getpid() % 100000)) != 0) return false;
  // TSan starts its background thread at the first thread creation: let that happen first.
  std::thread([] {}).join();
  const rlim_t limit = threads_of_this_process() + spare;
  rlimit r{limit, limit};
  if (setrlimit(RLIMIT_NPROC, &r) != 0) return false;
  // Probe: exactly `spare` threads may run at once.
  std::vector<std::thread> probe;
  try {
    for (size_t i = 0; i <= spare; ++i)
      probe.emplace_back([] { std::this_thread::sleep_for(std::chrono::milliseconds(50)); });
  } catch (const std::system_error&) {
  }
  const size_t started = probe.size();
  for (auto& t : probe) t.join();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the probes' tasks are reaped
  return started == spare;
}

}  // namespace pe::test
