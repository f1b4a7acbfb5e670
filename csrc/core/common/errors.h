// Typed errors thrown by the core. csrc/bindings/errors.cpp maps each one to a Python
// exception in one place; nothing else in the core knows about Python.
#pragma once

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pe {

// Bad arguments from the caller: maps to ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// An operating-system call failed: maps to OSError(errno, message, path).
class IoError : public std::runtime_error {
 public:
  IoError(int err, std::string path, const std::string& what)
      : std::runtime_error(what + ": " + std::strerror(err) + " [" + path + "]"),
        errno_(err),
        path_(std::move(path)) {}
  int error_number() const { return errno_; }
  const std::string& path() const { return path_; }

 private:
  int errno_;
  std::string path_;
};

// A checkpoint on disk is torn, corrupt or not ours: maps to pyengine.CheckpointError.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A dataset on disk is torn, corrupt or not ours: maps to pyengine.DataError.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_errno(const std::string& path, const std::string& what) {
  throw IoError(errno, path, what);
}

}  // namespace pe
