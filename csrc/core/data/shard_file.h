// One field of one shard of a dataset, memory-mapped read-only.
//
// On-disk layout (little-endian), written by src/pyengine/data/writer.py:
//   [0, 4096)            header: magic, version, kind, count, sizes, dtype, shape, checksums
//   [4096, 4096 + P)     payload: samples back to back (P = payload_bytes)
//   variable kind only:  at align8(4096 + P), count + 1 uint64 offsets into the payload
//   version 2 only:      at align8(end of the above), one uint32 CRC32C per block_bytes of
//                        payload (the block table); the header holds the table's CRC32C and
//                        the offset table's
// Every size is checked against the real file size on open, so a torn or foreign file is
// reported before any sample is read, naming the file and saying what to do. Version 1 files
// (one CRC32C over the whole payload, checked only by Verify::kOpen) still open.
//
// Every read of mapped bytes, here and by the callers of payload() / offsets(), must run
// inside guard_mapped_reads (common/mapped_read_guard.h): the file may be truncated while
// mapped. read_fault() turns the resulting MappedReadFault into a DataError naming the file.
//
// Concurrency: immutable after open except the per-block "checked" marks (atomic); any
// thread may read samples at the same time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/errors.h"
#include "data/block_checksums.h"

namespace pe::data {

constexpr uint64_t kHeaderBytes = 4096;
constexpr char kMagic[8] = {'P', 'E', 'D', 'A', 'T', 'A', '0', '1'};
constexpr uint32_t kFormatVersion = 2;      // what the writer writes
constexpr uint32_t kOldestFormatVersion = 1;  // the oldest this reader opens
// Bytes [0, kHeaderCrcOffset) of the header are covered by the header checksum.
constexpr uint64_t kHeaderCrcOffset = 508;
// The block sizes a version-2 header may record (powers of two); the writer's default is
// src/pyengine/data/format.py's BLOCK_BYTES.
constexpr uint64_t kMinBlockBytes = 512;
constexpr uint64_t kMaxBlockBytes = uint64_t{1} << 30;

enum class FieldKind : uint32_t { kFixed = 0, kVariable = 1 };

// When payload checksums are checked.
enum class Verify : uint32_t {
  kNever = 0,   // never (the caller's opt-out); structure and the header CRC are still checked
  kOnRead = 1,  // each block the first time it is read (version 2; version 1 files: never)
  kOpen = 2,    // everything, at open
};

// What the manifest (dataset.json) promises about a file; open() checks the file agrees.
struct ShardExpectation {
  std::string path;
  FieldKind kind;
  uint64_t count;
  uint64_t sample_bytes;  // fixed: bytes per sample; variable: bytes per element
  std::string dtype;      // numpy dtype.str, e.g. "<f4"
  // The sample shape the header must record (empty for variable fields); unset: not checked.
  // Sizes alone let a manifest reshape samples ([2, 2] read as [4]) without an error.
  std::optional<std::vector<uint64_t>> shape;
  uint32_t version = kFormatVersion;  // the manifest's format version; the header must agree
  uint64_t first_sample = 0;          // the dataset index of the file's sample 0 (for messages)
};

class ShardFile {
 public:
  // Maps the file and validates header and sizes; variable fields also get their offset
  // table checked (monotonic, inside the payload). Unless kNever, version 2 files also get
  // their offset and block tables checked against the header's CRCs; kOpen checks every
  // payload byte. Throws DataError (corrupt / torn) or IoError (cannot open).
  static ShardFile open(const ShardExpectation& expect, Verify verify);

  ~ShardFile();
  ShardFile(ShardFile&& other) noexcept;
  ShardFile& operator=(ShardFile&&) = delete;
  ShardFile(const ShardFile&) = delete;

  uint64_t count() const { return count_; }
  FieldKind kind() const { return kind_; }
  uint32_t version() const { return version_; }
  uint64_t payload_bytes() const { return payload_bytes_; }
  const uint8_t* payload() const { return base_ + kHeaderBytes; }
  const uint64_t* offsets() const { return offsets_; }
  const std::string& path() const { return path_; }
  // The block checksums reads are checked against; null for version 1 files and kNever.
  const BlockChecksums* block_checksums() const { return checks_.get(); }

  // Byte range of sample i inside the payload (reads the offset table: mapped memory).
  uint64_t sample_offset(uint64_t i) const { return offsets_ ? offsets_[i] : i * sample_bytes_; }
  uint64_t sample_size(uint64_t i) const { return offsets_ ? offsets_[i + 1] - offsets_[i] : sample_bytes_; }

  // Checks the payload blocks under [offset, offset + n) that this process has not checked
  // yet; throws DataError naming the file and the dataset samples of a bad block. One atomic
  // load per block once checked. Reads mapped memory.
  void verify(uint64_t offset, uint64_t n) const {
    if (checks_ == nullptr) return;
    const uint64_t bad = checks_->first_bad_block(offset, n);
    if (bad != BlockChecksums::kNoBlock) throw_corrupt_block(bad);
  }

  // Whether `address` lies in this file's mapping.
  bool maps(const void* address) const {
    const auto* a = static_cast<const uint8_t*>(address);
    return a >= base_ && a < base_ + map_bytes_;
  }
  // The error for a guarded read of this file that faulted: it shrank (or could not be read).
  DataError read_fault() const;

 private:
  ShardFile() = default;
  [[noreturn]] void throw_corrupt_block(uint64_t block) const;
  // The samples (local indices, [first, last]) whose bytes overlap payload [start, end).
  void samples_overlapping(uint64_t start, uint64_t end, uint64_t* first, uint64_t* last) const;

  std::string path_;
  FieldKind kind_ = FieldKind::kFixed;
  uint32_t version_ = 0;
  uint64_t count_ = 0;
  uint64_t sample_bytes_ = 0;
  uint64_t payload_bytes_ = 0;
  uint64_t first_sample_ = 0;
  const uint8_t* base_ = nullptr;
  uint64_t map_bytes_ = 0;
  const uint64_t* offsets_ = nullptr;
  std::unique_ptr<BlockChecksums> checks_;
};

}  // namespace pe::data
