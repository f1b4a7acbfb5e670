// A fresh directory for one test, removed with everything in it when the test ends.
#pragma once

#include <string>

namespace pe::test {

class TempDir {
 public:
  TempDir();  // under $TMPDIR (or /tmp); aborts the test on failure
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path/name, not created.
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // Creates path/name (a directory) and returns it.
  std::string make_subdir(const std::string& name) const;

 private:
  std::string path_;
};

// Whole-file helpers for the tests' own fixtures; failures fail the test.
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& bytes);
bool path_exists(const std::string& path);

}  // namespace pe::test
