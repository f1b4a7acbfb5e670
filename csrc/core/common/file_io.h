// Thin, checked wrappers over POSIX file calls. Every return value is checked: a short
// write, a failed fsync or a failed rename throws IoError with errno and the path, so a
// checkpoint is never committed on top of an I/O error (see Rebello et al., ATC'20: a
// failed fsync may leave pages marked clean, so it is never retried and trusted).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pe {

class File {
 public:
  enum class Mode { kRead, kCreateNew };

  File(const std::string& path, Mode mode);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  File(File&& other) noexcept;

  // Writes all of [data, data + n), retrying short writes and EINTR.
  void write_all(const void* data, size_t n);
  // Reads exactly n bytes at offset; a short read (file shrank) throws CheckpointError.
  void pread_exact(void* dst, size_t n, uint64_t offset) const;
  void sync();
  void close();
  // Turns O_DIRECT on or off for later writes. Returns false (and changes nothing) where
  // the filesystem does not support it, e.g. tmpfs.
  bool set_direct(bool on);
  uint64_t size() const;
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

// fsync a directory so a rename or create inside it is durable.
void sync_directory(const std::string& dir);
void make_directory(const std::string& dir);
// rename(2); fails (ENOTEMPTY / EEXIST) rather than replace a non-empty directory.
void rename_path(const std::string& from, const std::string& to);
// Removes a directory tree; errors are ignored (best effort cleanup of our own temp files).
void remove_tree_quietly(const std::string& path);
// Removes one file; errors (it may never have been created) are ignored.
void remove_file_quietly(const std::string& path);
std::vector<std::string> list_directory(const std::string& dir);
std::string join_path(const std::string& a, const std::string& b);

}  // namespace pe
