#include "data/shard_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "common/crc32c.h"
#include "common/errors.h"

namespace pe::data {
namespace {

// Field positions inside the 4096-byte header; pyengine/data/format.py packs the same.
struct RawHeader {
  char magic[8];
  uint32_t version;
  uint32_t kind;
  uint64_t count;
  uint64_t sample_bytes;
  uint64_t payload_bytes;
  uint32_t payload_crc32c;
  uint32_t ndim;
  char dtype[16];
  uint64_t shape[8];
};
static_assert(sizeof(RawHeader) == 128, "header layout must match pyengine/data/format.py");

const char* kHint = " Re-create it with pe.data.write_dataset (or from_torch_dataset).";

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw DataError("dataset file " + path + " " + what + "." + kHint);
}

uint64_t align8(uint64_t x) { return (x + 7) & ~uint64_t{7}; }

}  // namespace

ShardFile ShardFile::open(const ShardExpectation& expect, bool verify_payload) {
  const std::string& path = expect.path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno(path, "cannot open dataset file");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw IoError(err, path, "cannot stat dataset file");
  }
  const auto file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < kHeaderBytes) {
    ::close(fd);
    corrupt(path, "is truncated: " + std::to_string(file_bytes) + " bytes, shorter than its 4096-byte header");
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_SHARED, fd, 0);
  int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) throw IoError(map_err, path, "cannot mmap dataset file");

  ShardFile f;
  f.path_ = path;
  f.base_ = static_cast<const uint8_t*>(map);
  f.map_bytes_ = file_bytes;  // from here on, f's destructor unmaps on every error path

  RawHeader h{};
  std::memcpy(&h, f.base_, sizeof(h));
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) corrupt(path, "is not a pyengine dataset file (bad magic)");
  uint32_t stored_crc = 0;
  std::memcpy(&stored_crc, f.base_ + kHeaderCrcOffset, sizeof(stored_crc));
  if (crc32c(f.base_, kHeaderCrcOffset) != stored_crc) corrupt(path, "has a corrupt header (checksum mismatch)");
  if (h.version != kFormatVersion)
    corrupt(path, "has format version " + std::to_string(h.version) + ", this pyengine reads version " +
                      std::to_string(kFormatVersion));

  std::string dtype(h.dtype, strnlen(h.dtype, sizeof(h.dtype)));
  if (h.kind != static_cast<uint32_t>(expect.kind) || h.count != expect.count ||
      h.sample_bytes != expect.sample_bytes || dtype != expect.dtype)
    corrupt(path, "does not match dataset.json (kind, count, sample size or dtype differ; mixed-up files?)");
  if (expect.shape &&
      !(h.ndim <= 8 && std::equal(expect.shape->begin(), expect.shape->end(), h.shape, h.shape + h.ndim)))
    corrupt(path, "does not match dataset.json (the sample shape differs; mixed-up files?)");
  f.kind_ = expect.kind;
  f.count_ = h.count;
  f.sample_bytes_ = h.sample_bytes;
  f.payload_bytes_ = h.payload_bytes;

  // Each size is compared with what is left of the file before it enters a sum, so no sum can
  // wrap: a payload size near 2^64 would wrap align8(4096 + P) past zero and put the offset
  // table before the mapping.
  if (h.payload_bytes > file_bytes - kHeaderBytes)
    corrupt(path, "is truncated: " + std::to_string(file_bytes) + " bytes on disk, its header claims a " +
                      std::to_string(h.payload_bytes) + "-byte payload");
  uint64_t expected_bytes = 0;
  if (f.kind_ == FieldKind::kFixed) {
    if (h.sample_bytes != 0 && h.payload_bytes / h.sample_bytes != h.count) corrupt(path, "has inconsistent sizes");
    if (h.payload_bytes != h.count * h.sample_bytes) corrupt(path, "has inconsistent sizes");
    expected_bytes = kHeaderBytes + h.payload_bytes;
  } else {
    const uint64_t table = align8(kHeaderBytes + h.payload_bytes);  // <= file_bytes + 7: no wrap
    if (h.sample_bytes == 0 || h.count > (UINT64_MAX / 8) - 1 || 8 * (h.count + 1) > UINT64_MAX - table)
      corrupt(path, "has inconsistent sizes");
    expected_bytes = table + 8 * (h.count + 1);
  }
  if (file_bytes != expected_bytes)
    corrupt(path, (file_bytes < expected_bytes ? "is truncated: " : "has trailing bytes: ") +
                      std::to_string(file_bytes) + " bytes on disk, its header says " + std::to_string(expected_bytes));

  if (f.kind_ == FieldKind::kVariable) {
    f.offsets_ = reinterpret_cast<const uint64_t*>(f.base_ + align8(kHeaderBytes + h.payload_bytes));
    if (f.offsets_[0] != 0 || f.offsets_[f.count_] != f.payload_bytes_) corrupt(path, "has a corrupt offset table");
    for (uint64_t i = 0; i < f.count_; ++i) {
      if (f.offsets_[i + 1] < f.offsets_[i] || (f.offsets_[i + 1] - f.offsets_[i]) % f.sample_bytes_ != 0)
        corrupt(path, "has a corrupt offset table (entry " + std::to_string(i) + ")");
    }
  }
  if (verify_payload && crc32c(f.payload(), f.payload_bytes_) != h.payload_crc32c)
    corrupt(path, "has corrupt data (payload checksum mismatch)");
  return f;
}

ShardFile::ShardFile(ShardFile&& other) noexcept
    : path_(std::move(other.path_)),
      kind_(other.kind_),
      count_(other.count_),
      sample_bytes_(other.sample_bytes_),
      payload_bytes_(other.payload_bytes_),
      base_(other.base_),
      map_bytes_(other.map_bytes_),
      offsets_(other.offsets_) {
  other.base_ = nullptr;
  other.map_bytes_ = 0;
}

ShardFile::~ShardFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), map_bytes_);
}

}  // namespace pe::data
