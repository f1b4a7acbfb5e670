// Dataset files in the on-disk format of csrc/core/data/shard_file.h (what
// src/pyengine/data/writer.py writes), made by the tests without Python.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/mmap_dataset.h"
#include "temp_dir.h"

namespace pe::test {

// The bytes of one field-shard file holding `samples` (each sample's bytes, back to back), in
// format `version` (2: with a block table of `block_bytes` blocks; 1: without).
std::string field_file_bytes(data::FieldKind kind, uint64_t sample_bytes, const std::string& dtype,
                             const std::vector<std::string>& samples, uint32_t version = data::kFormatVersion,
                             uint64_t block_bytes = 512);

// Where a field-shard file's parts lie (for tests that damage one).
constexpr uint64_t kPayloadAt = data::kHeaderBytes;

// A dataset whose samples say who they are: field "index" (fixed, one little-endian uint64: the
// sample's global index) and, with `tokens`, field "tokens" (variable, int32: i % 4 copies of i).
// Files are index.<shard>.bin and tokens.<shard>.bin in `dir`, 512-byte blocks.
std::shared_ptr<const data::MmapDataset> make_index_dataset(const TempDir& dir,
                                                            const std::vector<uint64_t>& shard_counts, bool tokens,
                                                            data::Verify verify = data::Verify::kOpen,
                                                            uint32_t version = data::kFormatVersion);

}  // namespace pe::test
