#include "common/file_io.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "common/errors.h"

namespace pe {

File::File(const std::string& path, Mode mode) : path_(path) {
  int flags = mode == Mode::kRead ? O_RDONLY : (O_WRONLY | O_CREAT | O_EXCL);
  do {
    fd_ = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
  } while (fd_ < 0 && errno == EINTR);
  if (fd_ < 0) throw_errno(path, mode == Mode::kRead ? "cannot open for reading" : "cannot create");
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

File::File(File&& other) noexcept : fd_(other.fd_), path_(std::move(other.path_)) { other.fd_ = -1; }

void File::write_all(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  // Large writes are split so one call never exceeds what Linux accepts (~2 GiB).
  constexpr size_t kMaxChunk = size_t{1} << 30;
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n < kMaxChunk ? n : kMaxChunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw_errno(path_, "write failed");
    }
    if (w == 0) throw IoError(EIO, path_, "write made no progress");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void File::pread_exact(void* dst, size_t n, uint64_t offset) const {
  auto* p = static_cast<uint8_t*>(dst);
  constexpr size_t kMaxChunk = size_t{1} << 30;
  while (n > 0) {
    ssize_t r = ::pread(fd_, p, n < kMaxChunk ? n : kMaxChunk, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_errno(path_, "read failed");
    }
    if (r == 0) throw CheckpointError("unexpected end of file in " + path_ + " (was it truncated?)");
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
}

void File::sync() {
  if (::fsync(fd_) != 0) throw_errno(path_, "fsync failed");
}

bool File::set_direct(bool on) {
  int flags = ::fcntl(fd_, F_GETFL);
  if (flags < 0) throw_errno(path_, "fcntl(F_GETFL) failed");
  int wanted = on ? (flags | O_DIRECT) : (flags & ~O_DIRECT);
  if (wanted == flags) return true;
  if (::fcntl(fd_, F_SETFL, wanted) == 0) return true;
  if (errno == EINVAL) return false;
  throw_errno(path_, "fcntl(F_SETFL) failed");
}

void File::close() {
  if (fd_ < 0) return;
  int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0 && errno != EINTR) throw_errno(path_, "close failed");
}

uint64_t File::size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) throw_errno(path_, "fstat failed");
  return static_cast<uint64_t>(st.st_size);
}

void sync_directory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_errno(dir, "cannot open directory to fsync");
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) throw IoError(err, dir, "fsync of directory failed");
}

void make_directory(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) != 0) throw_errno(dir, "cannot create directory");
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) throw_errno(to, "cannot rename " + from + " to");
}

void remove_tree_quietly(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

void remove_file_quietly(const std::string& path) { ::unlink(path.c_str()); }

std::vector<std::string> list_directory(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) throw_errno(dir, "cannot list directory");
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(std::move(name));
  }
  ::closedir(d);
  return names;
}

std::string join_path(const std::string& a, const std::string& b) {
  if (a.empty() || a.back() == '/') return a + b;
  return a + "/" + b;
}

}  // namespace pe
