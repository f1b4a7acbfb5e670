// A dataset on disk: named fields, each split into the same shards, all memory-mapped.
//
// The Python layer reads dataset.json (the manifest, written last by the writer) and
// passes what it promises here; every file is then opened and checked against it.
// Concurrency: immutable after construction (but for the per-block "checked" marks, which
// are atomic); shared (shared_ptr) by the Python Dataset and every loader over it, read by
// any number of threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/shard_file.h"

namespace pe::data {

struct FieldSpec {
  std::string name;
  FieldKind kind;
  uint64_t sample_bytes;  // fixed: bytes per sample; variable: bytes per element
  std::string dtype;
  std::vector<std::string> shard_paths;        // one per shard, in order
  std::optional<std::vector<uint64_t>> shape;  // checked against every file: see ShardExpectation
};

class MmapDataset {
 public:
  // shard_counts[s] = samples in shard s (the same for every field); version: dataset.json's
  // format version, which every file's header must record.
  MmapDataset(const std::vector<FieldSpec>& fields, const std::vector<uint64_t>& shard_counts, Verify verify,
              uint32_t version = kFormatVersion);

  uint64_t size() const { return num_samples_; }
  size_t num_fields() const { return fields_.size(); }
  size_t num_shards() const { return shard_starts_.size() - 1; }
  const FieldSpec& spec(size_t field) const { return specs_[field]; }
  const ShardFile& shard(size_t field, size_t s) const { return fields_[field][s]; }
  Verify verify_mode() const { return verify_; }
  // Whether every read is checked against block checksums (version 2 files, not kNever).
  bool checks_blocks() const;

  // The shard holding global sample i, and i's index inside it.
  void locate(uint64_t i, size_t* shard, uint64_t* local) const;

  // sizes[f] = bytes of field f of sample i. Throws DataError if the file shrank.
  void sample_sizes(uint64_t i, uint64_t* sizes) const;
  // Copies field f of sample i into dst[f] (sample_sizes(i) bytes each), checking its blocks
  // first. Throws DataError (a bad block; a file that shrank).
  void read_sample(uint64_t i, uint8_t* const* dst) const;

  // The error for a guarded read that faulted at `address`, naming the file mapped there.
  DataError read_fault(const void* address) const;

 private:
  std::vector<FieldSpec> specs_;
  std::vector<std::vector<ShardFile>> fields_;  // [field][shard]
  std::vector<uint64_t> shard_starts_;          // prefix sums, size num_shards + 1
  uint64_t num_samples_ = 0;
  Verify verify_ = Verify::kOnRead;
};

}  // namespace pe::data
