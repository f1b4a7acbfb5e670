// What every libFuzzer target here shares: a reader over the fuzzer's bytes, the temp file the
// bytes are written to (the core's parsers take paths, as they do in production), and the
// contract failure that turns a wrong result into a crash libFuzzer keeps.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace pe::fuzz {

// Reads little-endian fields off the front of the input; past the end every field reads as 0,
// so each input, however short, is a request and the mutator never wastes work on framing.
class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  template <typename T>
  T take() {
    T v{};
    size_t n = std::min(sizeof(T), size_ - pos_);
    std::memcpy(&v, data_ + pos_, n);
    pos_ += n;
    return v;
  }
  std::string take_string(size_t n) {
    std::string s(n, '\0');
    size_t k = std::min(n, size_ - pos_);
    std::memcpy(s.data(), data_ + pos_, k);
    pos_ += k;
    return s.substr(0, strnlen(s.data(), n));
  }
  // The next `n` bytes (fewer at the end of the input).
  std::string take_bytes(size_t n) {
    size_t k = std::min(n, size_ - pos_);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), k);
    pos_ += k;
    return s;
  }
  std::string rest() { return take_bytes(size_ - pos_); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// The temp files of this process, removed at exit.
inline std::vector<std::string>& temp_files() {
  static std::vector<std::string> files;
  return files;
}

// A file in tmpfs holding the bytes under test; one name per process and slot, rewritten on
// every execution, so parallel fuzzers never share a file and none outlives the process
// (unless it crashes: .ci/fuzz gives the targets a scratch folder it removes).
inline std::string write_temp_file(const std::string& bytes, int slot = 0) {
  const char* dir = std::getenv("PE_FUZZ_TMPDIR");
  std::string path =
      std::string(dir ? dir : "/dev/shm") + "/pe-fuzz-" + std::to_string(::getpid()) + "-" + std::to_string(slot);
  if (std::find(temp_files().begin(), temp_files().end(), path) == temp_files().end()) {
    if (temp_files().empty())
      std::atexit([] {
        for (const std::string& f : temp_files()) ::unlink(f.c_str());
      });
    temp_files().push_back(path);
  }
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || ::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size()) || ::close(fd) != 0) {
    std::perror(path.c_str());
    std::abort();  // the harness, not the code under test, failed: stop rather than fuzz nothing
  }
  return path;
}

// The code under test returned something its contract forbids: report it and crash, so that
// libFuzzer saves the input.
[[noreturn]] inline void contract_violated(const std::string& what) {
  std::fprintf(stderr, "CONTRACT VIOLATED: %s\n", what.c_str());
  std::abort();
}

inline void require(bool ok, const std::string& what) {
  if (!ok) contract_violated(what);
}

}  // namespace pe::fuzz
