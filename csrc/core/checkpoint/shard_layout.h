// Where every tensor of a checkpoint goes: which shard, at which offset, and the
// safetensors header of each shard. Pure planning, no I/O, so it is cheap to validate all
// input before a save allocates or writes anything.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pe {

// Shard data starts at a multiple of this in the file and in staging, so shards can be
// written with O_DIRECT straight from staging memory.
constexpr uint64_t kFileAlign = 4096;

struct TensorSpec {
  std::string name;
  std::string dtype;  // safetensors dtype: F32, BF16, I64, BOOL, ...
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
};

struct PlacedTensor {
  TensorSpec spec;
  uint32_t shard = 0;
  uint64_t data_begin = 0;      // relative to the shard's data section
  uint64_t staging_offset = 0;  // where its bytes sit in the staging block
};

struct ShardPlan {
  std::string file_name;        // shard-00000-of-00004.safetensors
  std::string header;           // 8-byte little-endian length + JSON, padded to kFileAlign
  uint64_t data_bytes = 0;
  uint64_t staging_offset = 0;  // the shard's data is contiguous in staging, kFileAlign-aligned
  std::vector<size_t> tensors;  // indices into CheckpointLayout::tensors, in file order
  uint64_t file_bytes() const { return header.size() + data_bytes; }
};

struct CheckpointLayout {
  std::vector<PlacedTensor> tensors;  // in the caller's order
  std::vector<ShardPlan> shards;
  uint64_t total_data_bytes = 0;
  uint64_t staging_bytes = 0;  // total_data_bytes plus alignment padding between shards
};

// Bytes per element of a safetensors dtype; throws InvalidArgument for unknown names.
uint64_t dtype_size(const std::string& dtype);

// Throws InvalidArgument for duplicate or unsafe names, unknown dtypes, or a byte count
// that does not match dtype and shape. Tensors are spread over at most `max_shards`
// shards, balanced by bytes.
CheckpointLayout plan_layout(std::vector<TensorSpec> specs, size_t max_shards);

}  // namespace pe
