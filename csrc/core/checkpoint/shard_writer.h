// Writes one shard file (a valid safetensors file) from staging.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "checkpoint/shard_layout.h"

namespace pe {

struct ShardResult {
  uint32_t file_crc = 0;                          // CRC32C of the whole file
  std::unordered_map<size_t, uint32_t> tensor_crcs;  // layout tensor index -> CRC32C of its bytes
};

// Creates `path` (which must not exist), writes header and data, fsyncs and closes it.
// tensor_crcs holds each layout tensor's CRC32C, computed when it was copied into staging;
// the file's CRC is combined from them and the header's, without reading the data again.
ShardResult write_shard(const std::string& path, const CheckpointLayout& layout, size_t shard, const uint8_t* staging,
                        const std::vector<uint32_t>& tensor_crcs);

}  // namespace pe
