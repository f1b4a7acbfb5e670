// One field of one shard of a dataset, memory-mapped read-only.
//
// On-disk layout (little-endian), written by pyengine/data/writer.py:
//   [0, 4096)            header: magic, version, kind, count, sizes, dtype, shape, checksums
//   [4096, 4096 + P)     payload: samples back to back (P = payload_bytes)
//   variable kind only:  at align8(4096 + P), count + 1 uint64 offsets into the payload
// Every size is checked against the real file size on open, so a torn or foreign file is
// reported before any sample is read, naming the file and saying what to do.
//
// Concurrency: immutable after open; any thread may read samples at the same time.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace pe::data {

constexpr uint64_t kHeaderBytes = 4096;
constexpr char kMagic[8] = {'P', 'E', 'D', 'A', 'T', 'A', '0', '1'};
constexpr uint32_t kFormatVersion = 1;
// Bytes [0, kHeaderCrcOffset) of the header are covered by the header checksum.
constexpr uint64_t kHeaderCrcOffset = 508;

enum class FieldKind : uint32_t { kFixed = 0, kVariable = 1 };

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
};

class ShardFile {
 public:
  // Maps the file and validates header and sizes; variable fields also get their offset
  // table checked (monotonic, inside the payload). verify_payload reads everything and
  // checks the payload CRC32C. Throws DataError (corrupt / torn) or IoError (cannot open).
  static ShardFile open(const ShardExpectation& expect, bool verify_payload);

  ~ShardFile();
  ShardFile(ShardFile&& other) noexcept;
  ShardFile& operator=(ShardFile&&) = delete;
  ShardFile(const ShardFile&) = delete;

  uint64_t count() const { return count_; }
  FieldKind kind() const { return kind_; }
  uint64_t payload_bytes() const { return payload_bytes_; }
  const uint8_t* payload() const { return base_ + kHeaderBytes; }
  const uint64_t* offsets() const { return offsets_; }
  const std::string& path() const { return path_; }

  // Byte range of sample i inside the payload.
  uint64_t sample_offset(uint64_t i) const { return offsets_ ? offsets_[i] : i * sample_bytes_; }
  uint64_t sample_size(uint64_t i) const { return offsets_ ? offsets_[i + 1] - offsets_[i] : sample_bytes_; }

 private:
  ShardFile() = default;

  std::string path_;
  FieldKind kind_ = FieldKind::kFixed;
  uint64_t count_ = 0;
  uint64_t sample_bytes_ = 0;
  uint64_t payload_bytes_ = 0;
  const uint8_t* base_ = nullptr;
  uint64_t map_bytes_ = 0;
  const uint64_t* offsets_ = nullptr;
};

}  // namespace pe::data
