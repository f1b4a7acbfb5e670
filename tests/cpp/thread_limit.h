// Makes thread creation fail on purpose, to test what the core does when a thread cannot be
// started (EAGAIN under a process or memory limit). For gtest death-test children only: the
// limit cannot be lifted again.
#pragma once

#include <cstddef>

namespace pe::test {

// Whether limit_new_threads_to can work here: it needs root (see there).
bool can_limit_threads();

// Lets this process start only `spare` more threads from now on. RLIMIT_NPROC counts all tasks
// of the user and root ignores it, so the (root) process first becomes a user id of its own,
// derived from its pid, whose only tasks are this process's threads (a sanitizer's included),
// whatever else runs at the same time. Returns false when the limit could not be set, or did
// not bite as planned: the test would prove nothing.
bool limit_new_threads_to(size_t spare);

}  // namespace pe::test
