#include "data/shard_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "common/crc32c.h"
#include "common/mapped_read_guard.h"

namespace pe::data {
namespace {

// Field positions inside the 4096-byte header; src/pyengine/data/format.py packs the same. The
// last three are version 2's (zero in version 1 files).
struct RawHeader {
  char magic[8];
  uint32_t version;
  uint32_t kind;
  uint64_t count;
  uint64_t sample_bytes;
  uint64_t payload_bytes;
  uint32_t payload_crc32c;  // the whole payload's (the only payload checksum of version 1)
  uint32_t ndim;
  char dtype[16];
  uint64_t shape[8];
  uint64_t block_bytes;
  uint32_t block_table_crc32c;
  uint32_t offsets_crc32c;  // variable fields: the offset table's; 0 for fixed fields
};
static_assert(sizeof(RawHeader) == 144, "header layout must match src/pyengine/data/format.py");

const char* kHint = " Re-create it with pe.data.write_dataset (or from_torch_dataset).";

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw DataError("dataset file " + path + " " + what + "." + kHint);
}

uint64_t align8(uint64_t x) { return (x + 7) & ~uint64_t{7}; }

bool is_block_size(uint64_t b) { return b >= kMinBlockBytes && b <= kMaxBlockBytes && (b & (b - 1)) == 0; }

// What the checks over mapped memory found (they run in a guarded region, so they record
// rather than throw).
struct TableChecks {
  uint64_t bad_offset_entry = UINT64_MAX;  // first offset-table entry out of order
  bool offsets_crc_ok = true;
  bool block_table_crc_ok = true;
  bool payload_crc_ok = true;                       // version 1, Verify::kOpen
  uint64_t bad_block = BlockChecksums::kNoBlock;    // version 2, Verify::kOpen
};

}  // namespace

ShardFile ShardFile::open(const ShardExpectation& expect, Verify verify) {
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
  f.first_sample_ = expect.first_sample;

  // The header is read once, into a copy, so the checks below need no guard.
  uint8_t header[kHeaderCrcOffset + 4];
  try {
    guard_mapped_reads([&] { std::memcpy(header, f.base_, sizeof(header)); });
  } catch (const MappedReadFault&) {
    throw f.read_fault();
  }
  RawHeader h{};
  std::memcpy(&h, header, sizeof(h));
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) corrupt(path, "is not a pyengine dataset file (bad magic)");
  uint32_t stored_crc = 0;
  std::memcpy(&stored_crc, header + kHeaderCrcOffset, sizeof(stored_crc));
  if (crc32c(header, kHeaderCrcOffset) != stored_crc) corrupt(path, "has a corrupt header (checksum mismatch)");
  if (h.version < kOldestFormatVersion || h.version > kFormatVersion)
    corrupt(path, "has format version " + std::to_string(h.version) + ", this pyengine reads versions " +
                      std::to_string(kOldestFormatVersion) + " to " + std::to_string(kFormatVersion));
  if (h.version != expect.version)
    corrupt(path, "has format version " + std::to_string(h.version) + " but dataset.json says " +
                      std::to_string(expect.version) + " (mixed-up files?)");

  std::string dtype(h.dtype, strnlen(h.dtype, sizeof(h.dtype)));
  if (h.kind != static_cast<uint32_t>(expect.kind) || h.count != expect.count ||
      h.sample_bytes != expect.sample_bytes || dtype != expect.dtype)
    corrupt(path, "does not match dataset.json (kind, count, sample size or dtype differ; mixed-up files?)");
  if (expect.shape &&
      !(h.ndim <= 8 && std::equal(expect.shape->begin(), expect.shape->end(), h.shape, h.shape + h.ndim)))
    corrupt(path, "does not match dataset.json (the sample shape differs; mixed-up files?)");
  f.kind_ = expect.kind;
  f.version_ = h.version;
  f.count_ = h.count;
  f.sample_bytes_ = h.sample_bytes;
  f.payload_bytes_ = h.payload_bytes;
  const bool has_blocks = h.version >= 2;
  if (has_blocks && !is_block_size(h.block_bytes))
    corrupt(path, "has a corrupt header (block size " + std::to_string(h.block_bytes) +
                      " is not a power of two from 512 bytes to 1 GiB)");

  // Each size is compared with what is left of the file before it enters a sum, so no sum can
  // wrap: a payload size near 2^64 would wrap align8(4096 + P) past zero and put the offset
  // table before the mapping.
  if (h.payload_bytes > file_bytes - kHeaderBytes)
    corrupt(path, "is truncated: " + std::to_string(file_bytes) + " bytes on disk, its header claims a " +
                      std::to_string(h.payload_bytes) + "-byte payload");
  uint64_t tables_at = kHeaderBytes + h.payload_bytes;  // where the offset or block table starts
  if (f.kind_ == FieldKind::kFixed) {
    if (h.sample_bytes != 0 && h.payload_bytes / h.sample_bytes != h.count) corrupt(path, "has inconsistent sizes");
    if (h.payload_bytes != h.count * h.sample_bytes) corrupt(path, "has inconsistent sizes");
  } else {
    tables_at = align8(tables_at);  // <= file_bytes + 7: no wrap
    if (h.sample_bytes == 0 || h.count > (UINT64_MAX / 8) - 1 || 8 * (h.count + 1) > UINT64_MAX - tables_at)
      corrupt(path, "has inconsistent sizes");
  }
  const uint64_t offsets_at = tables_at;
  const uint64_t offsets_end = f.kind_ == FieldKind::kVariable ? offsets_at + 8 * (h.count + 1) : offsets_at;
  const uint64_t blocks = has_blocks ? BlockChecksums::num_blocks(h.payload_bytes, h.block_bytes) : 0;
  const uint64_t block_table_at = has_blocks ? align8(offsets_end) : offsets_end;  // no wrap: offsets_end <= 2^64 - 8
  if (block_table_at < offsets_end || 4 * blocks > UINT64_MAX - block_table_at) corrupt(path, "has inconsistent sizes");
  const uint64_t expected_bytes = block_table_at + 4 * blocks;
  if (file_bytes != expected_bytes)
    corrupt(path, (file_bytes < expected_bytes ? "is truncated: " : "has trailing bytes: ") +
                      std::to_string(file_bytes) + " bytes on disk, its header says " + std::to_string(expected_bytes));

  if (f.kind_ == FieldKind::kVariable) f.offsets_ = reinterpret_cast<const uint64_t*>(f.base_ + offsets_at);
  if (has_blocks && verify != Verify::kNever)
    f.checks_ = std::make_unique<BlockChecksums>(f.payload(), f.payload_bytes_, h.block_bytes, f.base_ + block_table_at);

  TableChecks found;
  try {
    guard_mapped_reads([&] {
      if (f.offsets_ != nullptr) {
        const uint64_t* o = f.offsets_;
        if (o[0] != 0 || o[f.count_] != f.payload_bytes_) found.bad_offset_entry = f.count_;
        for (uint64_t i = 0; i < f.count_ && found.bad_offset_entry == UINT64_MAX; ++i)
          if (o[i + 1] < o[i] || (o[i + 1] - o[i]) % f.sample_bytes_ != 0) found.bad_offset_entry = i;
        if (has_blocks && verify != Verify::kNever)
          found.offsets_crc_ok = crc32c(o, 8 * (f.count_ + 1)) == h.offsets_crc32c;
      }
      if (f.checks_ != nullptr)
        found.block_table_crc_ok = crc32c(f.base_ + block_table_at, 4 * blocks) == h.block_table_crc32c;
      if (verify == Verify::kOpen && found.bad_offset_entry == UINT64_MAX && found.offsets_crc_ok &&
          found.block_table_crc_ok) {
        if (f.checks_ != nullptr)
          found.bad_block = f.checks_->first_bad_block(0, f.payload_bytes_);
        else
          found.payload_crc_ok = crc32c(f.payload(), f.payload_bytes_) == h.payload_crc32c;
      }
    });
  } catch (const MappedReadFault&) {
    throw f.read_fault();
  }
  if (found.bad_offset_entry == f.count_) corrupt(path, "has a corrupt offset table");
  if (found.bad_offset_entry != UINT64_MAX)
    corrupt(path, "has a corrupt offset table (entry " + std::to_string(found.bad_offset_entry) + ")");
  if (!found.offsets_crc_ok) corrupt(path, "has a corrupt offset table (checksum mismatch)");
  if (!found.block_table_crc_ok) corrupt(path, "has a corrupt block checksum table (checksum mismatch)");
  if (!found.payload_crc_ok) corrupt(path, "has corrupt data (payload checksum mismatch)");
  if (found.bad_block != BlockChecksums::kNoBlock) {
    try {
      guard_mapped_reads([&] { f.throw_corrupt_block(found.bad_block); });  // reads the offset table
    } catch (const MappedReadFault&) {
      throw f.read_fault();
    }
  }
  return f;
}

void ShardFile::samples_overlapping(uint64_t start, uint64_t end, uint64_t* first, uint64_t* last) const {
  if (offsets_ == nullptr) {
    *first = start / sample_bytes_;  // a payload with blocks has bytes, so sample_bytes_ > 0
    *last = (end - 1) / sample_bytes_;
    return;
  }
  const uint64_t* table_end = offsets_ + count_ + 1;
  *first = static_cast<uint64_t>(std::upper_bound(offsets_, table_end, start) - offsets_) - 1;
  *last = static_cast<uint64_t>(std::upper_bound(offsets_, table_end, end - 1) - offsets_) - 1;
  *first = std::min(*first, count_ - 1);
  *last = std::min(*last, count_ - 1);
}

void ShardFile::throw_corrupt_block(uint64_t block) const {
  const uint64_t start = checks_->block_start(block), end = checks_->block_end(block);
  uint64_t first = 0, last = 0;
  samples_overlapping(start, end, &first, &last);
  first += first_sample_;
  last += first_sample_;
  throw DataError("dataset file " + path_ + " has corrupt data: payload bytes [" + std::to_string(start) + ", " +
                  std::to_string(end) + ") (checksum block " + std::to_string(block) + " of " +
                  std::to_string(checks_->num_blocks()) + ") do not match their checksum. They hold dataset samples " +
                  std::to_string(first) + " to " + std::to_string(last) +
                  " (every sample there is refused; the others read normally). Restore this file from a good copy, "
                  "or re-create the dataset with pe.data.write_dataset.");
}

DataError ShardFile::read_fault() const {
  struct stat st {};
  const bool stat_ok = ::stat(path_.c_str(), &st) == 0;
  const auto now = static_cast<uint64_t>(st.st_size);
  const std::string was = std::to_string(map_bytes_) + " bytes when the dataset was opened";
  if (!stat_ok || now < map_bytes_)
    return DataError("dataset file " + path_ + " shrank while being read: it is " +
                     (stat_ok ? std::to_string(now) + " bytes now, " : std::string("gone now, ")) + was +
                     ". A dataset's files must not change while it is open: restore the file (or re-create the "
                     "dataset with pe.data.write_dataset), then open the dataset again.");
  return DataError("dataset file " + path_ + " could not be read (SIGBUS reading its memory map; it is " +
                   std::to_string(now) + " bytes, as when the dataset was opened): an I/O error on the storage? "
                   "Check the device, then open the dataset again.");
}

ShardFile::ShardFile(ShardFile&& other) noexcept
    : path_(std::move(other.path_)),
      kind_(other.kind_),
      version_(other.version_),
      count_(other.count_),
      sample_bytes_(other.sample_bytes_),
      payload_bytes_(other.payload_bytes_),
      first_sample_(other.first_sample_),
      base_(other.base_),
      map_bytes_(other.map_bytes_),
      offsets_(other.offsets_),
      checks_(std::move(other.checks_)) {
  other.base_ = nullptr;
  other.map_bytes_ = 0;
}

ShardFile::~ShardFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), map_bytes_);
}

}  // namespace pe::data
