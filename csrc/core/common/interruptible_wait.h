// Blocking waits that the waiting caller can abandon. The core knows nothing of Python: a
// binding passes a Poll that checks for a pending signal and throws to end the wait (Ctrl-C
// then raises KeyboardInterrupt within one slice), while the work waited for goes on.
//
// Contract: the poll runs on the waiting thread, with the lock of the wait released, at least
// once per kPollSlice of waiting; an exception from it leaves the wait with the lock released
// (the caller's std::unique_lock then owns nothing) and propagates unchanged. An empty Poll
// waits without slices.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>

namespace pe {

using Poll = std::function<void()>;

constexpr std::chrono::milliseconds kPollSlice{100};

// Waits on `cv` until done() holds; done() is evaluated with `lock` held and may have effects
// (it is not called again once it returned true).
template <class Done>
void wait_polling(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, Done done, const Poll& poll) {
  if (!poll) {
    cv.wait(lock, done);
    return;
  }
  while (!cv.wait_for(lock, kPollSlice, done)) {
    lock.unlock();
    poll();
    lock.lock();
  }
}

}  // namespace pe
