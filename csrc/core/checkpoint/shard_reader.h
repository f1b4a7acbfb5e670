// Reads checkpoint shards into caller-provided buffers and verifies them.
//
// Nothing is trusted: the file's real size must equal the manifest's, every tensor's
// offset and length must lie inside the data section before any byte is read, and every
// tensor's CRC32C must match, and the whole file's: read, or, when only some tensors are read,
// combined from the header's CRC and the manifest's tensor CRCs.
// Errors name the file and the tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pe {

struct TensorRead {
  std::string name;
  uint64_t offset = 0;  // absolute, in the file
  uint64_t nbytes = 0;
  uint32_t crc32c = 0;
  uint8_t* dst = nullptr;
};

// Where a tensor lies in its shard and its checksum, as the (verified) manifest records them.
struct TensorExtent {
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  uint32_t crc32c = 0;
};

struct ShardRead {
  std::string path;
  uint64_t file_bytes = 0;
  uint64_t header_bytes = 0;  // 8-byte length + JSON
  uint32_t file_crc32c = 0;
  std::vector<TensorRead> tensors;
  // Every tensor of the shard (optional). With it, a read of only some tensors still checks
  // the header: the file's CRC is the header's combined with the manifest's tensor CRCs.
  std::vector<TensorExtent> extents;
};

// Reads every shard, up to `threads` at a time. Throws CheckpointError or IoError.
void read_shards(std::vector<ShardRead>& shards, size_t threads);

// Streams the whole file and checks its size and CRC32C, without keeping the bytes.
void verify_file(const std::string& path, uint64_t file_bytes, uint32_t file_crc32c);

}  // namespace pe
